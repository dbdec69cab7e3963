"""Thin Typer commands: parse, call the core, render (STYLE 8)."""
