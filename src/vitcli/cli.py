"""The `vit` command: parses arguments, builds a Recipe, calls one function per subcommand.

No training logic lives here. User mistakes arrive as VitError and leave as one message and exit
code 2; `--debug` anywhere on the command line shows the traceback instead.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import click
import typer
from rich.console import Console
from rich.table import Table

from vitcli.errors import VitError

app = typer.Typer(
    name="vit",
    help="Pretrain, fine-tune and evaluate Vision Transformers (Dosovitskiy et al., ICLR 2021).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)

SET_HELP = "Override a recipe field, e.g. --set optim.lr=3e-4 (repeatable)."


@app.command()
def pretrain(
    recipe: Path = typer.Argument(..., help="YAML recipe, e.g. recipes/quickstart.yaml."),
    out: Optional[Path] = typer.Option(None, "--out", help="Run directory (default runs/<recipe>-<time>)."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out (or the newest run of this recipe) from its last checkpoint."),
    force: bool = typer.Option(False, "--force", help="Delete the run already in --out and start again."),
    device: Optional[str] = typer.Option(None, "--device", help="auto | cpu | cuda (default: the recipe's train.device)."),
) -> None:
    """Train a model from scratch as the recipe says; writes a run directory."""
    from vitcli.engine.rundir import default_run_dir, newest_run
    from vitcli.engine.trainer import train
    from vitcli.recipe import load_recipe

    overrides = list(set_ or [])
    if device is not None:
        overrides.append(f"train.device={device}")
    r = load_recipe(recipe, overrides)
    if out is None:
        out = newest_run(prefix=f"{r.name}-") if resume else None
        if resume and out is None:
            raise VitError(f"--resume: no earlier run of '{r.name}' under runs/. Pass --out RUN_DIR.")
        out = out or default_run_dir(r)
    summary = train(r, out, resume=resume, force=force, console=console)
    _print_summary(summary)


def _print_summary(summary: dict) -> None:
    best = summary["best_top1"]
    console.print(
        f"done: {summary['steps']} steps in {summary['wall_seconds']:.1f}s; "
        f"best top-1 {best:.4f}, final top-1 {summary['final_top1']:.4f}\n"
        f"run: {summary['run_dir']}\nbest checkpoint: {summary['checkpoint']}"
    )


@app.command("models")
def models_cmd(
    pattern: str = typer.Argument("*", help="Shell-style pattern, e.g. 'vit_b*'."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """List the registered models with their sizes."""
    from vitcli.models import list_models, model_info

    infos = [model_info(name) for name in list_models(pattern)]
    if not infos:
        raise VitError(f"No model matches '{pattern}'. Run `vit models` to see them all.")
    if as_json:
        print(json.dumps(infos, indent=2))
        return
    table = Table(title=f"vitcli models ({len(infos)})")
    for col in ("name", "params", "resolution", "patch", "width", "depth", "heads", "MLP", "aliases"):
        table.add_column(col, justify="right" if col not in ("name", "aliases") else "left")
    for i in infos:
        size = i["img_size"]
        res = f"{size}" if isinstance(size, int) else f"{size[0]}x{size[1]}"
        table.add_row(i["name"], f"{i['params'] / 1e6:,.1f}M", res, str(i["patch_size"]), str(i["embed_dim"]), str(i["depth"]), str(i["num_heads"]), str(i["mlp_dim"]), ", ".join(i.get("aliases", [])[:3]))
    console.print(table)


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    args = [a for a in args if a != "--debug"]
    try:
        app(args=args, prog_name="vit", standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        err_console.print("aborted")
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except VitError as e:
        if debug:
            raise
        err_console.print(f"[bold red]error:[/] {e}", highlight=False)
        sys.exit(e.exit_code)
    except Exception as e:
        from vitcli.engine.signals import STOPPED_EXIT_CODE, StopRequested

        if isinstance(e, StopRequested):
            err_console.print(f"Stopped at step {e.step}; checkpoint saved in {e.run_dir}. Resume with the same command plus --out {e.run_dir} --resume.")
            sys.exit(STOPPED_EXIT_CODE)
        raise


if __name__ == "__main__":
    main()
