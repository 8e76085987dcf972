"""Where a recipe comes from: a file the user names, or one of the recipes shipped inside the package.

The shipped recipes are the top-level `recipes/` folder of the source tree (the one users read and
edit); `src/vitcli/recipes` links to it so wheels and editable installs carry the same files, read
through importlib.resources. A recipe can be named without a path (`vit pretrain quickstart`); a file of
that name in the working directory wins, and the start line says which one was taken.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from vitcli.errors import VitError, did_you_mean

SUFFIX = ".yaml"
PURPOSE_WIDTH = 110


def shipped_dir() -> Path:
    """The folder of shipped recipes (a real folder: pip installs packages unzipped)."""
    return Path(str(resources.files("vitcli") / "recipes"))


def shipped_names() -> list[str]:
    folder = shipped_dir()
    return sorted(p.stem for p in folder.glob(f"*{SUFFIX}")) if folder.is_dir() else []


def shipped(name: str) -> Path | None:
    """The shipped recipe called `name` (with or without .yaml), if there is one."""
    path = shipped_dir() / f"{_stem(name)}{SUFFIX}"
    return path if path.is_file() else None


def is_shipped(path: Path) -> bool:
    return path.resolve().parent == shipped_dir().resolve()


def purpose(path: Path) -> str:
    """A recipe's one-line purpose: the first sentence of its header comment."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        text = line.lstrip("#").strip()
        if not text:
            break
        lines.append(text)
    header = " ".join(lines)
    while (plain := re.sub(r" ?\([^()]*\)", "", header)) != header:  # asides in brackets, nested ones too
        header = plain
    header = header.split(". ")[0].rstrip(".")
    colon = header.find(": ", 30)  # "...'s settings: AdamW, lr ..." -> the part before the details
    header = header[:colon] if colon >= 0 else header
    return header if len(header) <= PURPOSE_WIDTH else header[: header.rfind(" ", 0, PURPOSE_WIDTH)] + " ..."


@dataclass(frozen=True)
class RecipeFile:
    path: Path
    origin: str  # what the start line says about where the recipe came from

    @property
    def shipped(self) -> bool:
        return is_shipped(self.path)


def locate(arg: str | Path) -> RecipeFile:
    """The recipe a command line names: a path to a file, or a shipped recipe's name ("quickstart"). A
    file in the working directory wins over the shipped recipe of the same name; `recipes/NAME.yaml`
    that does not exist here (outside the checkout) is the shipped one."""
    text = str(arg)
    path = Path(text)
    name = _stem(path.name)
    bare = path.parent == Path(".")
    here = path if path.is_file() else (Path(f"{text}{SUFFIX}") if bare and not text.endswith(SUFFIX) else None)
    packaged = shipped(name) if (bare or path.parent.name == "recipes") else None
    if here is not None and here.is_file():
        if bare and packaged is not None:
            return RecipeFile(here, f"the recipe file {here} from the working directory (it shadows the shipped recipe '{name}': "
                                    f"`vit recipes show {name}` prints that one)")
        return RecipeFile(here, f"the recipe file {here}")
    if packaged is not None:
        return RecipeFile(packaged, f"the shipped recipe '{name}' (`vit recipes show {name}` prints it)")
    if path.is_dir():
        raise VitError(f"Recipe '{text}' is a folder; pass a YAML recipe file or a shipped recipe's name, e.g. quickstart.")
    if not bare:
        raise VitError(f"Recipe file '{text}' does not exist. Pass the path of a YAML recipe, or a shipped recipe's "
                       f"name ({', '.join(shipped_names()[:3])}, ...: `vit recipes` lists them).")
    raise VitError(f"Recipe '{text}' is neither a file here nor a shipped recipe.{did_you_mean(name, shipped_names())} "
                   "`vit recipes` lists the shipped ones.")


def _stem(name: str) -> str:
    return name[: -len(SUFFIX)] if name.endswith(SUFFIX) else name
