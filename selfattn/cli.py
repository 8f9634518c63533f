"""The ``selfattn`` command line.

Library commands live here. The upper layers (``data_checks``, ``flows``) contribute their
commands through the ``selfattn.cli`` entry-point group, so this module never imports them.
Heavy libraries (torch, prefect, mlflow, ...) are imported inside the commands, keeping
``selfattn --help`` fast.
"""

from __future__ import annotations

import json
import sys
from importlib.metadata import entry_points
from pathlib import Path

import typer

from selfattn.errors import UserError

ENVIRONMENT_HELP = (
    "Environment: SELFATTN_HOME, where runs, the MLflow and Optuna stores and Prefect's database live "
    "(default ./.selfattn); SELFATTN_DATA_DIR, local copies of the data (default: the public sources, "
    "SST-2 from the Hugging Face hub and Tiny Shakespeare from its URL); MLFLOW_TRACKING_URI and "
    "PREFECT_API_URL, servers that replace the embedded stores."
)

app = typer.Typer(
    name="selfattn",
    help="Self-attention models and the pipeline that trains, tunes, evaluates, registers and promotes them.",
    epilog=ENVIRONMENT_HELP,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # help text is plain text: Rich markup would eat the brackets of --set 'search.space[optim.lr].high=0.01'
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _print_version(value: bool) -> None:
    if value:
        from selfattn import __version__

        print(__version__)
        raise typer.Exit(0)


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", is_eager=True, callback=_print_version, help="print the selfattn version and exit"),
) -> None:
    """Self-attention models and the pipeline that trains, tunes, evaluates, registers and promotes them."""


@app.command()
def version() -> None:
    """Print the selfattn version."""
    from selfattn import __version__

    print(__version__)


# --------------------------------------------------------------------------- training

_CONFIG_OPT = typer.Option(None, "--config", "-c", metavar="FILE", help="YAML/JSON config file")
_SET_OPT = typer.Option([], "--set", "-s", metavar="KEY=VALUE", help="dotted override, e.g. --set train.max_steps=100 (repeatable)")


def _setup_logging() -> None:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


@app.command()
def pretrain(
    config: Path = _CONFIG_OPT,
    overrides: list[str] = _SET_OPT,
    output: Path = typer.Option(..., "--output", "-o", help="output directory (checkpoints, best/, metrics.json, plots/)"),
) -> None:
    """Pretrain a causal LM, or an encoder with objective=mlm (resumes automatically when OUTPUT holds a checkpoint)."""
    from selfattn.config import load_config
    from selfattn.train import PretrainConfig
    from selfattn.train import pretrain as run_pretrain

    cfg = load_config(PretrainConfig, config, overrides)
    _setup_logging()
    result = run_pretrain(cfg, output)
    print(json.dumps({"out_dir": str(result.out_dir), "best_dir": str(result.best_dir), **result.metrics}))


@app.command()
def finetune(
    config: Path = _CONFIG_OPT,
    overrides: list[str] = _SET_OPT,
    output: Path = typer.Option(..., "--output", "-o", help="output directory (checkpoints, best/, metrics.json, plots/)"),
) -> None:
    """Fine-tune a sequence classifier (from scratch, from init_from, or with LoRA)."""
    from selfattn.config import load_config
    from selfattn.train import FinetuneConfig
    from selfattn.train import finetune as run_finetune

    cfg = load_config(FinetuneConfig, config, overrides)
    _setup_logging()
    result = run_finetune(cfg, output)
    print(json.dumps({"out_dir": str(result.out_dir), "best_dir": str(result.best_dir), **result.metrics}))


@app.command()
def evaluate(
    model: list[Path] = typer.Option(..., "--model", "-m", help="a save_pretrained directory (or a training output dir: its best/); repeat it to evaluate classifiers as an ensemble (mean of their probabilities)"),
    data: str = typer.Option(..., "--data", "-d", help="a data file or hub id, or a YAML file holding the data section"),
    overrides: list[str] = _SET_OPT,
    output: Path = typer.Option(..., "--output", "-o", help="where metrics.json and plots/ go"),
) -> None:
    """Evaluate a saved model (or an ensemble of classifiers) on data: metrics.json and plots under OUTPUT."""
    from selfattn.eval.evaluate import (
        data_config_for,
        evaluate_checkpoint,
        evaluate_ensemble,
    )

    model_dirs = [m / "best" if not (m / "config.json").is_file() and (m / "best" / "config.json").is_file() else m for m in model]
    data_cfg = data_config_for(model_dirs[0], data, overrides)
    _setup_logging()
    if len(model_dirs) == 1:
        metrics = evaluate_checkpoint(model_dirs[0], data_cfg, output)
    else:
        metrics = evaluate_ensemble(model_dirs, data_cfg, output)
    print(json.dumps({k: v for k, v in metrics.items() if not isinstance(v, (list, dict))}))


@app.command()
def convert(
    src: str = typer.Argument(..., help="source: a directory; with --from-hf also pkg:PACKAGE/path (inside an installed package) or a hub id; with --from-gguf a .gguf file or pkg: path to one"),
    dst: Path = typer.Argument(..., help="destination directory (must not exist, or be empty / a checkpoint); with --to-gguf the .gguf file to write"),
    from_hf: bool = typer.Option(False, "--from-hf", help="SRC is a Hugging Face model (dir, pkg: path or hub id) -> selfattn checkpoint"),
    to_hf: bool = typer.Option(False, "--to-hf", help="SRC is a selfattn checkpoint -> Hugging Face directory (AutoModelForCausalLM, AutoModel, AutoModelForMaskedLM or AutoModelForSequenceClassification, by model)"),
    from_gguf: bool = typer.Option(False, "--from-gguf", help="SRC is a GGUF file (llama, qwen2, qwen3; any quant type the gguf package dequantizes) -> selfattn checkpoint"),
    to_gguf: bool = typer.Option(False, "--to-gguf", help="SRC is a selfattn decoder LM checkpoint (LoRA merged) -> one GGUF file for llama.cpp / Ollama"),
    quant: str = typer.Option("f32", "--quant", help="--to-gguf: f32, f16, bf16 or q8_0 for the 2-D weights (norms stay f32)"),
    bf16: bool = typer.Option(False, "--bf16", help="--from-gguf: keep the weights in bfloat16 (default float32)"),
) -> None:
    """Convert between Hugging Face checkpoints (GPT-2, Llama, Mistral, Qwen2, Qwen3; BERT, RoBERTa, DistilBERT), GGUF files (llama, qwen2, qwen3) and selfattn checkpoints."""
    directions = {"from-hf": from_hf, "to-hf": to_hf, "from-gguf": from_gguf, "to-gguf": to_gguf}
    chosen = [name for name, on in directions.items() if on]
    if len(chosen) != 1:
        raise UserError("convert needs exactly one of --from-hf, --to-hf (Hugging Face), --from-gguf or --to-gguf (GGUF)")
    direction = chosen[0]
    if direction.endswith("gguf"):
        import torch

        from selfattn.io.gguf import convert_from_gguf, convert_to_gguf

        out = convert_from_gguf(src, dst, dtype=torch.bfloat16 if bf16 else torch.float32) if from_gguf else convert_to_gguf(src, dst, quant=quant)
    else:
        from selfattn.io.hf import convert_from_hf, convert_to_hf

        out = convert_from_hf(src, dst) if from_hf else convert_to_hf(src, dst)
    print(json.dumps({"out_dir": str(out), "direction": direction}))


def _register_plugins() -> None:
    for ep in entry_points(group="selfattn.cli"):
        try:
            register = ep.load()
        except ImportError as exc:  # an optional layer that is not installed
            print(f"warning: CLI plugin {ep.name!r} could not be loaded: {exc}", file=sys.stderr)
            continue
        register(app)


# Imported only by the plugin commands (data_checks, flows); the library installs without them.
_PIPELINE_PACKAGES = {"prefect", "mlflow", "optuna", "great_expectations", "rich", "psutil", "psycopg", "psycopg2"}
EXIT_MISSING_EXTRA = 4


def _plain_argument(param) -> None:
    """Click's form for an argument in the usage line and the help (``NAME``, ``[NAME]``, ``TEXTS...``)
    instead of Typer's (``{name}``, ``name <str>``)."""
    name = (param.name or "").upper() + ("..." if param.nargs != 1 else "")
    usage = name if param.required else f"[{name}]"
    param._usage_display_name = lambda: usage
    param._rich_display_name = lambda: name
    param.display_type = param.display_type_rich = lambda ctx=None: ""
    param.get_error_hint = lambda ctx=None: f"'{name.removesuffix('...')}'"


def readable_metavars(command) -> None:
    """Metavars in the conventional form (``--port INTEGER``, ``--host TEXT``, a flag with none)
    instead of Typer's type names (``<int>``, ``<list[str]>``, ``<bool>``); explicit ones are kept."""
    names = {"int": "INTEGER", "float": "FLOAT", "str": "TEXT", "Path": "PATH", "bool": ""}
    for param in command.params:
        if param.metavar is not None:
            continue
        if getattr(param, "param_type_name", "") == "argument":  # TEXTS..., not {texts}... <list[str]>
            _plain_argument(param)
            continue
        if getattr(param, "param_type_name", "") != "option":
            continue
        if param.is_flag:
            param.metavar = ""
        elif not param.type_descriptor.is_choice:  # choices stay listed
            bare = param.bare_type()
            bare = bare.removeprefix("list[").removesuffix("]")
            param.metavar = names.get(bare, bare.upper())
    for sub in getattr(command, "commands", {}).values():
        readable_metavars(sub)


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point: user mistakes become one paragraph and a non-zero exit."""
    _register_plugins()
    command = typer.main.get_command(app)
    readable_metavars(command)
    try:
        rc = command.main(args=argv, prog_name="selfattn", standalone_mode=False)  # typer.Exit(n) comes back as n
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in _PIPELINE_PACKAGES:
            raise  # a missing core dependency is a broken install: keep the traceback
        command = next((a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("-")), "this command")
        print(
            f"error: `selfattn {command}` needs {exc.name}, which is not installed. The library installs alone; "
            'the pipeline commands need its extra: pip install "selfattn[pipeline]"',
            file=sys.stderr,
        )
        return EXIT_MISSING_EXTRA
    except typer.Exit as exc:
        return exc.exit_code
    except SystemExit as exc:
        return int(exc.code or 0) if not isinstance(exc.code, str) else 1
    except typer.Abort:
        print("aborted", file=sys.stderr)
        return 130
    except typer.exceptions.TyperException as exc:  # usage errors: bad option, missing argument
        if hasattr(exc, "show"):
            exc.show()
        return getattr(exc, "exit_code", 2)
    return rc if isinstance(rc, int) else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
