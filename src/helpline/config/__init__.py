"""What a deployment says: settings (environment), sites (sites.toml), business hours."""
