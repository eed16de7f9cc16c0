"""Shared test settings: deterministic seeds and small thread counts (the CI machine has 2 cores).

Triton reads TRITON_INTERPRET when it is first imported, which may happen in any test (torch and
transformers import it when installed), so the interpreter is chosen here, before anything else, for
machines without a GPU: the Triton kernels' tests then run on the CPU.
"""

import os
import shutil

if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    yield


ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def load_file_module():
    """``load(name, path) -> module``: import a file that is not part of a package (a script under ``scripts/``, a
    helper beside the tests) once per session, under ``name``; ``path`` relative to the repository root."""
    import importlib.util
    import sys

    def load(name: str, path: str):
        if name not in sys.modules:
            spec = importlib.util.spec_from_file_location(name, ROOT / path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
        return sys.modules[name]

    return load


# Prelude of a child process that must not see this project: `python -I` (no PYTHONPATH, no cwd on
# sys.path) plus a finder that refuses its packages, which may still be installed in site-packages.
_WITHOUT_PACKAGE = '''
import importlib.abc, json, sys

class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("hf_efficient", "hf_efficient_kernels", "hf_efficient_model_cards"):
            raise ImportError(name + " is blocked in this process")
        return None

sys.meta_path.insert(0, Refuse())
try:
    import hf_efficient  # noqa: F401
except ImportError:
    pass
else:
    raise SystemExit("hf_efficient was importable")
'''


@pytest.fixture
def run_without_package(tmp_path):
    """``run(body, jobs) -> dict``: run ``body`` (Python source that reads ``json.loads(sys.argv[1])`` and
    prints one JSON line last) in a fresh interpreter where hf_efficient cannot be imported, offline."""
    import json
    import subprocess
    import sys
    import textwrap

    def run(body: str, jobs) -> dict:
        script = tmp_path / "child.py"
        script.write_text(_WITHOUT_PACKAGE + textwrap.dedent(body))
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
        env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), TRANSFORMERS_VERBOSITY="error")
        proc = subprocess.run([sys.executable, "-I", str(script), json.dumps(jobs)], capture_output=True,
                              text=True, env=env, cwd=tmp_path, timeout=300)
        assert proc.returncode == 0, proc.stderr[-4000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    return run


class CountedBlocks:
    """The decoding extension's direct calls, counting the decoder blocks that ran compiled: one per
    ``decoder_block_step`` call, one per block of a ``decoder_stack_step`` call (``stacks`` counts those calls)."""

    def __init__(self, calls):
        self._calls, self.n, self.stacks = calls, 0, 0

    def __getattr__(self, name: str):
        fn = getattr(self._calls, name)
        if name not in ("decoder_block_step", "decoder_stack_step"):
            return fn

        def run(*args):
            out = fn(*args)  # counted once it returned: a block that raised did not run
            self.n += 1 if name == "decoder_block_step" else len(args[1])
            self.stacks += name == "decoder_stack_step"
            return out

        return run

    def __getitem__(self, key: str) -> int:
        return getattr(self, key)

    def __setitem__(self, key: str, value: int) -> None:
        setattr(self, key, value)


@pytest.fixture
def block_calls(monkeypatch):
    """How many decoder blocks ran compiled (``block_calls["n"]``), alone or in a step's one call for the whole
    stack (``block_calls["stacks"]``)."""
    from hf_efficient_kernels import dispatch

    assert dispatch._decode_cpu_kernel()[0]
    calls = CountedBlocks(dispatch._DECODE_CALLS)
    monkeypatch.setattr(dispatch, "_DECODE_CALLS", calls)
    return calls
