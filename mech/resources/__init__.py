"""Package data: Cloud et al.'s number-prompt spec, the trait system prompt, and eval question lists.

Everything is read through importlib.resources (so it works from a wheel or zip) and parsed once.
Question lists are found by file name: ``resources/{category}_questions.txt`` or
``resources/{category}_questions_{tag}.txt`` (e.g. ``animal_questions_cloud50.txt``), one question a line;
adding a category is adding such a file.
"""

from __future__ import annotations

import copy
import functools
import json
import re
from importlib import resources as _ilr
from typing import Any

from mech.errors import MechError

_PACKAGE = "mech.resources"
NUMBER_PROMPT_FILE = "cloud_number_prompts.json"
_QUESTION_FILE = re.compile(r"^(?P<category>[a-z][a-z0-9_]*?)_questions(?:_[A-Za-z0-9]+)?\.txt$")


def _resource_dir():
    return _ilr.files(_PACKAGE)


@functools.lru_cache(maxsize=None)
def _read_text(name: str) -> str:
    return _resource_dir().joinpath(name).read_text(encoding="utf-8")


@functools.lru_cache(maxsize=1)
def _number_prompt_spec() -> dict[str, Any]:
    return json.loads(_read_text(NUMBER_PROMPT_FILE))


def number_prompt_spec() -> dict[str, Any]:
    """The parsed ``cloud_number_prompts.json`` (a fresh copy: callers may mutate it freely)."""
    return copy.deepcopy(_number_prompt_spec())


def trait_system_prompt(target: str, category: str) -> str:
    """Cloud et al.'s trait system prompt, filled in literally.

    The template starts its third sentence with ``{target}s``, so ``owl`` gives "... owls are your
    favorite animal." in lower case: kept as the template has it, not capitalised.
    """
    if not target.strip() or not category.strip():
        raise MechError(
            f"trait system prompt needs a non-empty target and category (got target={target!r}, "
            f"category={category!r}); pass e.g. target='owl', category='animal'"
        )
    return _number_prompt_spec()["trait_system_prompt"].format(target=target, category=category)


@functools.lru_cache(maxsize=1)
def _question_files() -> dict[str, str]:
    found: dict[str, list[str]] = {}
    for entry in _resource_dir().iterdir():
        m = _QUESTION_FILE.match(entry.name)
        if m:
            found.setdefault(m.group("category"), []).append(entry.name)
    for category, names in found.items():
        if len(names) > 1:
            raise MechError(
                f"several question files for category {category!r} in mech/resources: "
                f"{', '.join(sorted(names))}; keep exactly one"
            )
    return {category: names[0] for category, names in found.items()}


def question_categories() -> list[str]:
    return sorted(_question_files())


@functools.lru_cache(maxsize=None)
def _questions(category: str) -> tuple[str, ...]:
    files = _question_files()
    if category not in files:
        raise MechError(
            f"no questions for category {category!r}: available categories are "
            f"{', '.join(sorted(files)) or 'none'}; to add one, create "
            f"mech/resources/{category}_questions.txt with one question per line"
        )
    lines = (line.strip() for line in _read_text(files[category]).splitlines())
    qs = tuple(line for line in lines if line and not line.startswith("#"))
    if not qs:
        raise MechError(
            f"question file mech/resources/{files[category]} is empty; "
            "write one question per line"
        )
    return qs


def questions(category: str) -> list[str]:
    """The eval questions for a trait category ("animal" → Cloud et al.'s 50, "tree" → 30)."""
    return list(_questions(category.strip().lower()))
