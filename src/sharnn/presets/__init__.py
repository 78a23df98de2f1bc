"""Built-in presets: flat TOML files of settings applied before --config and flags."""
