"""The `llama-orch dashboard` TUI (Textual). Business logic stays in the core:
the app gets a DataSource and only renders what it returns and forwards actions."""
