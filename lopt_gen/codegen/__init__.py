"""Code generation: printers and template rendering per target."""
