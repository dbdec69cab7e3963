"""Model files: references and the catalog of pulled files (`catalog`), the
Hugging Face adapter (`hub`), GGUF headers (`gguf`), the pull/list/rm use
cases (`pull`) and the tiny model the tests and the demo generate (`tiny`)."""
