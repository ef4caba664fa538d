"""Prompt files (package data). Read them with `read_prompt_file`, never from the current directory."""

from importlib.resources import files


def read_prompt_file(name: str) -> str:
    return files(__name__).joinpath(name).read_text(encoding="utf-8")
