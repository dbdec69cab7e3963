"""What an instance is and how it launches (DESIGN §1, §2): the config
models (`instance`, `upstream`, `settings`, on `section`), parsing and
saving them (`parse`), their checks (`validate`), a checked launch
(`prepare`), argv and environment (`command`), VRAM (`fit`), `init`
(`create`) and finding llama-server (`binary`)."""
