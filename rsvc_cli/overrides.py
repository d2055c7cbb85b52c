"""The command line's overrides before and after Hydra: shorthands in, rsvc's own messages out.

Before composition, `model1=NAME` becomes Hydra's `model@model1=NAME` and a new key of a free-form
mapping (`model.kwargs.depth=32`) is added without the user's `+`. When composition fails, the
Hydra exception becomes one `RsvcError` paragraph: the key or option that is wrong, the closest
valid ones, whether `+` would help (almost never), and how to quote a value. After composition,
keys that a `+` added but no schema holds (`+layers=[...]` on `rsvc compare`) are refused rather
than silently ignored. `stage_help` is a stage's short `--help`.
"""

from __future__ import annotations

import difflib
import os
import re
import textwrap
from dataclasses import fields, is_dataclass
from typing import Any

from rsvc_cli.errors import RsvcError

# Config groups mounted under another name in pair stages: `model1=X` means `model@model1=X`.
GROUP_ALIASES = {"model1": "model@model1", "model2": "model@model2"}
# Free-form mappings of the schemas: any key may be added to them (constructor arguments, per-class
# probabilities), so rsvc adds it as Hydra's `++key=value` (set, or add if new).
FREE_MAPPINGS = ("kwargs", "class_probability")
# Characters a value may hold without quotes in Hydra's grammar (and an rsvc list of names).
PLAIN_VALUE = re.compile(r"[A-Za-z0-9_./:\-+*?@%$~{}]*")
# The settings behind `+` when it is right: adding a key a free-form mapping does not have yet.
PLUS_EXPLAINED = ("(A `+` adds a new key, which only model.kwargs and dataset.kwargs can take, and rsvc adds "
                  "those without it.)")


def model_presets() -> set[str]:
    from importlib.resources import files

    return {p.name[:-5] for p in files("rsvc_cli.configs").joinpath("model").iterdir() if p.name.endswith(".yaml")}


def config_groups() -> dict[str, list[str]]:
    """Every config group in configs/ with its options (file names without .yaml)."""
    from importlib.resources import files

    root = files("rsvc_cli.configs")
    return {d.name: sorted(p.name[:-5] for p in d.iterdir() if p.name.endswith(".yaml"))
            for d in root.iterdir() if d.is_dir() and d.name not in ("hydra", "local", "__pycache__")}


def split_prefix(item: str) -> tuple[str, str]:
    for p in ("++", "+", "~"):
        if item.startswith(p):
            return p, item[len(p):]
    return "", item


def in_free_mapping(key: str) -> bool:
    """`model1.kwargs.depth`: a key of a free-form mapping."""
    parts = key.split(".")
    return len(parts) >= 2 and parts[-2] in FREE_MAPPINGS


def normalize_overrides(overrides: list[str]) -> list[str]:
    """Rewrite `model1=NAME` / `model2=NAME` (also with a `~`/`+`/`++` prefix) to Hydra's group@package form.

    A model name without a preset in configs/model/ (any timm name, e.g. `model=convnext_tiny`)
    becomes `model.name=NAME` on the default preset, so every timm model works by name. A key
    inside a free-form mapping (`model.kwargs.depth=32`) is set or added (`++`). A path value
    starting with `~/` is the home folder's (the shell leaves a quoted `~` alone).
    """
    presets = None
    out = []
    for item in overrides:
        prefix, body = split_prefix(item)
        key, sep, value = body.partition("=")
        if key in ("model", "model1", "model2") and sep and not prefix and "," not in value and "(" not in value:
            presets = presets if presets is not None else model_presets()
            if value not in presets:
                out.append(f"{key}.name={value}")
                continue
        if key in GROUP_ALIASES and (sep or prefix == "~"):
            body = GROUP_ALIASES[key] + sep + value
        if value.startswith("~/") or value == "~":  # a quoted '~/x' reaches rsvc unexpanded; make it the home folder
            body = key + sep + os.path.expanduser(value)
        if sep and prefix in ("", "+") and in_free_mapping(key):
            prefix = "++"
        out.append(prefix + body)
    return out + shared_extraction_overrides(out)


def shared_extraction_overrides(overrides: list[str]) -> list[str]:
    """A sweep over `layer1=a,b,c` records all of a, b, c in one pass of model 1 (likewise layer2).

    Each job of the sweep then asks for the same layer set; the first one extracts it, the others
    wait on the artifact locks and reuse it, so each model sees each image once per sweep.
    """
    keys = {item.partition("=")[0] for item in overrides}
    extra = []
    for n in ("1", "2"):
        for item in overrides:
            key, _, value = item.partition("=")
            if key == f"layer{n}" and "," in value and not value.startswith(("[", "range(", "glob(", "choice(")) \
                    and f"extract_layers{n}" not in keys:
                extra.append(f"extract_layers{n}=[{value}]")
    return extra


# ------------------------------------------------------------------------------------------
# Composition
# ------------------------------------------------------------------------------------------


def compose(stage: str, overrides: list[str]):
    """The stage's config with `overrides` (already normalized), outside any Hydra run."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    from rsvc_cli.config import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="rsvc_cli.configs", version_base="1.3"):
        return hydra_compose(config_name=stage, overrides=overrides)


def flat_keys(node, prefix: str = "") -> list[str]:
    """Every key of a composed config as a dotted path (mappings and their leaves)."""
    from omegaconf import DictConfig

    keys = []
    for key in node.keys() if isinstance(node, DictConfig) else []:
        path = f"{prefix}{key}"
        keys.append(path)
        child = node._get_node(key)
        if isinstance(child, DictConfig):
            keys += flat_keys(child, path + ".")
    return keys


def unknown_keys(node, prefix: str = "") -> list[str]:
    """Keys a `+` added that the stage's schema does not hold: nothing would read them."""
    from omegaconf import DictConfig, OmegaConf

    schema = OmegaConf.get_type(node)
    if not is_dataclass(schema):
        return []
    known = {f.name for f in fields(schema)}
    found = []
    for key in node.keys():
        if key == "hydra":
            continue
        if key not in known:
            found.append(f"{prefix}{key}")
            continue
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_missing() and not child._is_none():
            found += unknown_keys(child, f"{prefix}{key}.")
    return found


def check_known_keys(stage: str, cfg) -> None:
    unknown = unknown_keys(cfg)
    if unknown:
        key = unknown[0]
        raise RsvcError(f"`{key}` is not a setting of rsvc {stage}: it was added with `+` (on the command line or in "
                        f"a preset) and nothing would read it."
                        f"{close_keys_hint(key, [k for k in flat_keys(cfg) if k not in unknown])}",
                        f"Set an existing key without `+` (`rsvc {stage} --cfg job` lists them all). {PLUS_EXPLAINED}")


def check_added_keys(stage: str, overrides: list[str]) -> None:
    """Before Hydra makes a run folder: keys a `+`/`++` adds outside a free-form mapping must be
    ones the schema holds. Only such command lines pay for this extra composition."""
    adding = [o for o in overrides if split_prefix(o)[0] in ("+", "++")
              and not in_free_mapping(split_prefix(o)[1].partition("=")[0])]
    if not adding:
        return
    try:
        cfg = compose(stage, [o for o in overrides if o not in ("-m", "--multirun")])
    except Exception:  # sweeps and bad overrides: Hydra's own composition reports them
        return
    check_known_keys(stage, cfg)


def close_keys_hint(key: str, candidates: list[str]) -> str:
    """" Did you mean a, b?" over dotted keys, matching the whole path and its last part."""
    last = key.rpartition(".")[2]
    close = difflib.get_close_matches(key, candidates, n=3, cutoff=0.6)
    by_last = {c.rpartition(".")[2]: c for c in candidates}
    close += [by_last[m] for m in difflib.get_close_matches(last, list(by_last), n=3, cutoff=0.7)]
    close = list(dict.fromkeys(close))
    return f" Did you mean {', '.join(close[:3])}?" if close else ""


# ------------------------------------------------------------------------------------------
# Hydra's failures as rsvc's paragraphs
# ------------------------------------------------------------------------------------------


def quoted(override: str) -> str:
    """`key=value` with every value (or list element) that needs it in double quotes, for the shell
    in single quotes: `'dataset.classes=["hot dog",café]'` becomes `'dataset.classes=["hot dog","café"]'`."""
    key, _, value = override.partition("=")

    def q(v: str) -> str:
        v = v.strip()
        return v if PLAIN_VALUE.fullmatch(v) or v[:1] in "'\"" else '"' + v.replace('"', '\\"') + '"'

    if value.startswith("[") and value.endswith("]"):
        value = "[" + ",".join(q(v) for v in value[1:-1].split(",")) + "]"
    else:
        value = q(value)
    return f"'{key}={value}'"


def parse_error(stage: str, overrides: list[str]) -> RsvcError:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    bad = None
    for item in overrides:
        try:
            parser.parse_overrides([item])
        except Exception:  # Hydra's parser raises its own and ANTLR's exceptions
            bad = item
            break
    if bad is None:
        return RsvcError(f"The command line of rsvc {stage} cannot be parsed as overrides.",
                         "Write each setting as key=value, lists as [a,b], and quote values with spaces.")
    value = bad.partition("=")[2]
    needs_quotes = any(ord(c) > 127 or c.isspace() for c in value)
    if needs_quotes:
        return RsvcError(f"`{bad}` holds a space or a non-ASCII character, which an unquoted override cannot hold.",
                         f"Put such a value (or each such list element) in double quotes and the whole argument in "
                         f"single quotes for the shell: {quoted(bad)}.")
    return RsvcError(f"`{bad}` is not a valid override.",
                     "Write key=value; lists as [a,b] with matching brackets, mappings as {k:v}; quote a value "
                     "holding spaces, commas, brackets or non-ASCII characters (\"...\"), and the whole argument "
                     "in single quotes for the shell.")


def composition_error(stage: str, overrides: list[str], error: Exception) -> RsvcError:
    """The RsvcError for a Hydra failure to compose `rsvc <stage> <overrides>`."""
    from hydra.errors import MissingConfigException, OverrideParseException

    text = str(error)
    if isinstance(error, OverrideParseException):
        return parse_error(stage, overrides)
    if isinstance(error, MissingConfigException):
        return missing_option_error(stage, text)
    keys = [split_prefix(o)[1].partition("=")[0] for o in overrides]
    if stage_is_pair(stage) and "model" in keys:  # `+model=NAME` fails in Hydra's defaults list
        return unknown_key_error(stage, "model", overrides)
    m = re.search(r"Could not override '([^']+)'", text)
    if m:
        return unknown_key_error(stage, m.group(1), overrides)
    m = re.search(r"An item is already at '([^']+)'", text) or re.search(r"Multiple values for (\S+?)\.", text)
    if m:
        key = m.group(1)
        item = next((o for o in overrides if split_prefix(o)[1].startswith(key + "=")), f"+{key}=...")
        return RsvcError(f"`{item}` adds `{key}`, which rsvc {stage} already has.",
                         f"Set it without the `+`: {split_prefix(item)[1]}. {PLUS_EXPLAINED}")
    m = re.search(r"Error merging override (\S+)", text)
    if m:
        cause = error.__cause__
        why = str(getattr(cause, "msg", cause) or "").splitlines()[0] if cause else ""
        return RsvcError(f"`{m.group(1)}` has a value of the wrong type{f' ({why})' if why else ''}.",
                         f"Give a value of the key's type: `rsvc {stage} --cfg job` shows every key with its current "
                         "value (numbers as 0.1, booleans as true/false, lists as [a,b]).")
    first = text.strip().splitlines()[0] if text.strip() else type(error).__name__
    return RsvcError(f"The command line does not make a valid configuration for rsvc {stage}: {first}",
                     f"`rsvc {stage} --help` lists the config groups and their options, "
                     f"`rsvc {stage} --cfg job` every key with its value.")


def missing_option_error(stage: str, text: str) -> RsvcError:
    m = re.search(r"Could not find '([^'/]+)/([^']+)'", text)
    if not m:
        first = text.strip().splitlines()[0]
        return RsvcError(f"A config rsvc {stage} needs cannot be found ({first}).",
                         "Check the group=option overrides and any hydra.searchpath folder.")
    group, option = m.groups()
    options = config_groups().get(group, [])
    close = difflib.get_close_matches(option, options, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    extra = " (or any timm name: model=convnext_tiny)" if group == "model" else ""
    return RsvcError(f"`{option}` is not an option of the config group `{group}`.{hint}",
                     f"Choose one of {', '.join(options)}{extra}; a preset file of your own is found once its folder "
                     f"is on the search path: hydra.searchpath=[file:///abs/path/to/configs] with the file in "
                     f"<that folder>/{group}/{option}.yaml.")


def unknown_key_error(stage: str, key: str, overrides: list[str]) -> RsvcError:
    given = next((o for o in overrides if split_prefix(o)[1].partition("=")[0] == key), key)
    value = given.partition("=")[2]
    top, _, rest = key.partition(".")
    top = top.rpartition("@")[2]  # `model1=NAME` reaches Hydra as `model@model1=NAME`
    if top == "model" and stage_is_pair(stage):
        choice = value if rest in ("", "name") and value else "NAME"
        setting = f" and their keys as model1.{rest}={value or '...'}" if rest not in ("", "name") else ""
        return RsvcError(f"rsvc {stage} compares two models, so it has no `model` (and `+model=` would not make one).",
                         f"Choose each with model1={choice} and model2={choice}{setting}.")
    if top in ("model1", "model2") and not stage_is_pair(stage):
        return RsvcError(f"rsvc {stage} works on one model, so it has no `{top}`.",
                         f"Write `model{'.' + rest if rest else ''}={value or '...'}` instead.")
    try:
        candidates = flat_keys(compose(stage, []))
    except Exception:  # the suggestion is a nicety; the error stands without it
        candidates = []
    groups = config_groups()
    candidates += list(groups) + (["model1", "model2"] if stage_is_pair(stage) else [])
    return RsvcError(f"`{key}` is not a setting of rsvc {stage}.{close_keys_hint(key, candidates)}",
                     f"Use one of its keys (`rsvc {stage} --cfg job` lists them all, `rsvc {stage} --help` the config "
                     f"groups); `+{key}=` would only add a key nothing reads. {PLUS_EXPLAINED}")


def stage_is_pair(stage: str) -> bool:
    return stage in ("regress", "score", "importance", "collage", "report", "compare")


# ------------------------------------------------------------------------------------------
# --help
# ------------------------------------------------------------------------------------------


def value_text(value: Any) -> str:
    import json

    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, dict)):
        return json.dumps(value, ensure_ascii=False).replace('"', "").replace(" ", "")
    return str(value)


def applicable(path: str, node: dict) -> dict:
    """The part of a config block that applies: a switched-off block is only its switch, the
    synthetic set's own keys only for dataset=synthetic, an empty free-form mapping not at all."""
    out = {}
    synthetic_only = ("n_classes", "image_size", "synthetic_seed", "class_cues")
    for key, value in node.items():
        if isinstance(value, dict) and "enabled" in value and not value["enabled"]:
            out[f"{key}.enabled"] = False
        elif path.endswith("dataset") and key in synthetic_only and node.get("name") != "synthetic":
            continue
        elif key in ("_target_", *FREE_MAPPINGS) and not value:
            continue
        elif isinstance(value, dict) and value:
            out.update({f"{key}.{k}": v for k, v in applicable(f"{path}.{key}", value).items()})
        else:
            out[key] = value
    return out


def stage_help(stage: str, description: str, overrides: list[str]) -> str:
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(compose(stage, overrides), resolve=False)
    groups = config_groups()
    used = {g for g in groups if g in cfg or (g == "model" and "model1" in cfg)}
    used |= {"experiment"} if stage in ("compare", "train") else set()
    lines = [f"rsvc {stage}: {description}.", "",
             f"usage: rsvc {stage} [group=option ...] [key=value ...] [-m] [--cfg job] [--debug]", "",
             "Config groups (group=option):"]
    for group in sorted(used):
        name = "model1, model2" if group == "model" and stage_is_pair(stage) else group
        extra = ", or any timm name" if group == "model" else ""
        lines += textwrap.wrap(f"{name}: {', '.join(groups[group])}{extra}", width=100, initial_indent="  ",
                               subsequent_indent="      ")
    lines += ["", "Settings (key=value; `--cfg job` prints the full config):"]
    scalars = {k: v for k, v in cfg.items() if not isinstance(v, dict)}
    blocks = {k: v for k, v in cfg.items() if isinstance(v, dict)}
    wrap = dict(width=100, initial_indent="  ", subsequent_indent="      ", break_long_words=False,
                break_on_hyphens=False)
    lines += textwrap.wrap("  ".join(f"{k}={value_text(v)}" for k, v in scalars.items()), **wrap)
    for name, block in blocks.items():
        flat = applicable(name, block)
        lines += textwrap.wrap(f"{name}: " + "  ".join(f"{k}={value_text(v)}" for k, v in flat.items()), **wrap)
    example = "model1=cifar_resnet20 model2=cifar_resnet56 regression.alpha=0.05" if stage_is_pair(stage) \
        else "model=cifar_resnet56 store=/tmp/rsvc"
    lines += ["", f"Example: rsvc {stage} {example}",
              "A quoted value holds spaces or accents: 'dataset.classes=[\"hot dog\",\"café\"]'. "
              "`rsvc --help` lists the stages."]
    return "\n".join(lines)
