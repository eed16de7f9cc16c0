"""Model families of hf_efficient (each in its own folder, registered with the Auto classes on import)."""
