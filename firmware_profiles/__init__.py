"""Device profiles shipped with ctre-edge (TOML files); see ctre_edge/profiles.py."""
