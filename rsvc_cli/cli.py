"""`rsvc <stage> [hydra overrides]`: dispatch to the stage's Hydra application.

Each stage has a primary config `configs/<stage>.yaml` and a task function `run(cfg)` in
`rsvc_cli/stages/<stage>.py`. This module is the thin shell around them: it picks the stage,
rewrites the overrides (`rsvc_cli/overrides.py`: `model1=NAME` is Hydra's `model@model1=NAME`), prints
a stage's short `--help`, and turns a user error (`RsvcError`, or a command line Hydra cannot
compose) into one paragraph on stderr and exit code 2. `--debug` (or
RSVC_DEBUG=1) shows tracebacks instead.
"""

from __future__ import annotations

import errno
import importlib
import os
import sys
import textwrap
from pathlib import Path

from rsvc_cli import runtime
from rsvc_cli.errors import EXIT_USER_ERROR, RsvcError
from rsvc_cli.overrides import (GROUP_ALIASES, check_added_keys, check_known_keys,  # noqa: F401 (re-exported)
                                composition_error, normalize_overrides, stage_help)

# stage -> (one-line description, module under rsvc_cli.stages)
STAGES: dict[str, str] = {
    "extract": "record layer activations of one model on the patches of the image sets",
    "decompose": "concepts of one model's layer per class (NMF, semi-NMF, PCA, k-means)",
    "regress": "cross-validated regressions between the two models' concepts (2->1, 1->2, 1->1, 2->2)",
    "score": "per-concept similarity, concept correlation table, CKA; a table, lowest first",
    "importance": "concept importance (integrated gradients) and the replacement test",
    "collage": "top / over / under image collages for every concept",
    "report": "a self-contained HTML report of a comparison",
    "compare": "every stage above for one model pair and layer pair, reusing what is stored",
    "summarize": "layer x layer similarity matrices over a sweep or a store",
    "train": "train or fine-tune a classifier (planted-concept experiments)",
    "layers": "list a model's layers with their output shapes",
    "info": "describe an artifact (path=FILE) or a whole store",
    "doctor": "check a store, list incomplete or orphaned artifacts, clean them (clean=true)",
}

def print_user_error(err: RsvcError) -> None:
    text = textwrap.fill(f"rsvc: {err.message}", width=100, break_long_words=False, break_on_hyphens=False)
    print(text, file=sys.stderr)


def debug_enabled() -> bool:
    return os.environ.get("RSVC_DEBUG", "") not in ("", "0", "false")


def os_user_error(err: OSError, store: str) -> RsvcError | None:
    """The user-fixable OSErrors any write can meet (a lock, a collage, a table, not only an
    artifact): a full disk, or a store that cannot be written. None for anything else."""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        where = f" while writing {err.filename}" if err.filename else ""
        return RsvcError(f"No space left on the device{where}; the complete artifacts in the store are untouched.",
                         "Free disk space or point store=DIR at a larger disk, then run the same command again.")
    in_store = bool(store) and str(err.filename or "").startswith(str(Path(store).expanduser()))
    if in_store and err.errno == errno.EROFS:
        return RsvcError(f"The store is read-only, and this run needs to write {err.filename}; the artifacts it "
                         "already holds were used and nothing in it was changed.",
                         "Copy the store to a writable disk and point store=DIR at the copy; to read the numbers "
                         "alone from a complete read-only store, add collage.enabled=false report=false.")
    if in_store and err.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EEXIST):
        return RsvcError(f"Cannot write {err.filename} in the store ({err.strerror}).",
                         "Point store=DIR at a folder you can write (it is created if missing), not at a file.")
    return None


# Hydra flags that only print (help, config, search path): they make no run folder.
INFO_FLAGS = {"--help", "-h", "--hydra-help", "--cfg", "-c", "--info", "-i", "--resolve", "--version"}
# Stages whose Hydra run folder lies under the store (configs/run_settings.yaml); the others run in ".".
STORE_RUN_DIR_STAGES = {"extract", "decompose", "regress", "score", "importance", "collage", "report", "compare",
                        "train"}


# A read-only store keeps Hydra's run record out of it: no run folder, no .hydra files.
READ_ONLY_STORE_OVERRIDES = ["hydra.run.dir=.", "hydra.output_subdir=null"]


def check_store(stage: str, overrides: list[str]) -> list[str]:
    """The store must be a folder, and writable or existing, before Hydra makes its run folder
    inside it (Hydra's own failure there is a traceback). An existing store that cannot be written
    (a read-only mount) serves every run whose artifacts it holds: the returned overrides keep
    Hydra's run record out of it, and the first write it would need is the error. As root,
    permission bits stop nothing: the cases met are a store path naming a file, or a file on the
    way to it, or a read-only mount."""
    if stage not in STORE_RUN_DIR_STAGES or any(item in INFO_FLAGS for item in overrides):
        return []
    given = [item.partition("=")[2] for item in overrides if item.partition("=")[0].lstrip("+") == "store"]
    store = given[-1] if given else os.environ.get("RSVC_STORE", "")
    if not store or any(c in store for c in ",$("):  # a sweep or an interpolation: Hydra resolves it
        return []
    path = Path(store).expanduser()
    blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
    reason = f"{blocker} is a file" if blocker is not None else None
    # Nothing is created here (a command line that does not compose leaves no folder behind):
    # the nearest existing folder on the way must let rsvc write.
    existing = next((p for p in (path, *path.parents) if p.is_dir()), None)
    writable = existing is None or os.access(existing, os.W_OK | os.X_OK)
    if reason is None and existing == path and not writable:
        return [] if "-m" in overrides or "--multirun" in overrides else READ_ONLY_STORE_OVERRIDES
    if reason is None and not writable:
        reason = f"{existing} is not writable"
    if reason is not None:
        raise RsvcError(f"The store {path} cannot be used as a folder to write artifacts in ({reason}).",
                        "Point store=DIR at a folder you can write (it is created if missing), not at a file.")
    return []


def run_task(task, cfg, stage: str | None = None):
    """Call a stage's task function, turning user errors into a paragraph and exit code 2.

    With `stage`, keys a `+` added that the stage's schema does not hold are refused first."""
    from rsvc_cli.config import check_unused_options

    try:
        if stage is not None:
            check_known_keys(stage, cfg)
        check_unused_options(cfg)  # no silent no-ops, before any work
        return task(cfg)
    except RsvcError as err:
        if debug_enabled():
            raise
        print_user_error(err)
        raise SystemExit(EXIT_USER_ERROR) from None
    except OSError as err:
        user_error = os_user_error(err, str(cfg.get("store", "")) if hasattr(cfg, "get") else "")
        if debug_enabled() or user_error is None:
            raise
        print_user_error(user_error)
        raise SystemExit(EXIT_USER_ERROR) from None
    except KeyboardInterrupt:
        print("rsvc: interrupted; complete artifacts are kept and the interrupted one resumes on the next run.",
              file=sys.stderr)
        raise SystemExit(130) from None


def usage() -> str:
    width = max(map(len, STAGES))
    lines = ["usage: rsvc <stage> [hydra overrides] [--help] [--cfg job] [-m]", "", "stages:"]
    lines += [f"  {name:<{width}}  {text}" for name, text in STAGES.items()]
    lines += ["", "Each stage's own help: rsvc <stage> --help.   Tracebacks for bug reports: --debug.",
              "Examples:",
              "  rsvc layers model=cifar_resnet20",
              "  rsvc compare experiment=cifar_r20_vs_r56 store=/tmp/rsvc",
              "  rsvc compare -m experiment=cifar_r20_vs_r56 layer1=layer1,layer2,layer3 layer2=layer1,layer2,layer3"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    runtime.configure()  # OpenMP waiting and memory reuse, before torch loads
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--debug" in argv:
        argv.remove("--debug")
        os.environ["RSVC_DEBUG"] = "1"
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from rsvc_cli import __version__

        print(f"rsvc {__version__}")
        return 0
    if os.environ.get("RSVC_STORE", "").startswith("~"):  # Hydra's run folder is ${store}/.runs: never ./~
        os.environ["RSVC_STORE"] = os.path.expanduser(os.environ["RSVC_STORE"])
    stage, overrides = argv[0], argv[1:]
    if stage not in STAGES:
        import difflib

        close = difflib.get_close_matches(stage, STAGES, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        print_user_error(RsvcError(f"'{stage}' is not an rsvc stage.{hint}",
                                   f"Run `rsvc --help` for the list: {', '.join(STAGES)}."))
        return EXIT_USER_ERROR
    return run_stage(stage, normalize_overrides(overrides))


def run_stage(stage: str, overrides: list[str]) -> int:
    if any(item in ("--help", "-h") for item in overrides):
        # rsvc's own short help: composing the config takes a second, importing the stage (torch) several.
        rest = [item for item in overrides if item not in ("--help", "-h")]
        try:
            print(stage_help(stage, STAGES[stage], rest))
        except Exception as err:  # the same paragraphs as a run for overrides that do not compose
            if debug_enabled():
                raise
            print_user_error(composition_error(stage, rest, err))
            return EXIT_USER_ERROR
        return 0

    import hydra

    from rsvc_cli.config import register_configs

    register_configs()
    started = []

    @hydra.main(config_path="pkg://rsvc_cli.configs", config_name=stage, version_base="1.3")
    def _hydra_main(cfg):
        started.append(True)
        module = importlib.import_module(f"rsvc_cli.stages.{stage}")  # after --cfg/--info, which need no torch
        return run_task(module.run, cfg, stage)

    try:
        check_added_keys(stage, overrides)
        overrides = overrides + check_store(stage, overrides)
    except RsvcError as err:
        if debug_enabled():
            raise
        print_user_error(err)
        return EXIT_USER_ERROR
    # Hydra's parser takes its flags before the overrides only: `rsvc compare a=1 -m b=1,2` works too.
    flags = [item for item in overrides if item in ("-m", "--multirun")]
    saved = sys.argv, os.environ.get("HYDRA_FULL_ERROR")
    sys.argv = [f"rsvc {stage}", *flags, *[item for item in overrides if item not in flags]]
    # Hydra then raises its composition errors instead of printing them with its own advice
    # ("Set HYDRA_FULL_ERROR=1"); rsvc says what is wrong in its own words, --debug shows the traceback.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        _hydra_main()
    except Exception as err:
        if started or debug_enabled():
            raise
        print_user_error(composition_error(stage, [item for item in overrides if item not in flags], err))
        raise SystemExit(EXIT_USER_ERROR) from None
    finally:
        sys.argv = saved[0]
        if saved[1] is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = saved[1]
    return 0
