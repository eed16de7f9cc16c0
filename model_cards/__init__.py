"""Model-card templates (Jinja2) for efficient checkpoints; rendered by hf_efficient.integrations.export."""
