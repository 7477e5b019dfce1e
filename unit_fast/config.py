"""Configs: YAML files packaged in ``unit_fast/configs/``, merged onto ``defaults.yaml``.

``load_config(name_or_path, overrides=())`` returns a plain nested dict:
  1. ``defaults.yaml`` (every key a config may set, with MMF's default values);
  2. the chain of ``base:`` files the named file inherits from, oldest first;
  3. the file itself;
  4. ``overrides``: dotted ``key=value`` strings (``model.base_args.dec_layers=2``), the value read
     as YAML (``1e-4``, ``true``, ``[1, 2]``, ``null``).
A key that the defaults do not have is an error naming the key, except below a mapping whose
default is empty (``{}``): those are open maps (``num_queries``, ``bert.config``, ...), and
below ``OPEN_SECTIONS`` (per-dataset heads, for any dataset name).
"""

import copy
import os
from importlib import resources

import yaml

CONFIG_DIR = "configs"

# Keys that were renamed: old dotted key -> new one.  Typed by a user, an old key is an error
# naming the new one; found in the config a checkpoint stores, it is moved (``migrate_renamed``).
RENAMED = {
    "model.backend": "model.implementation",  # fast | reference; "backend" now means a kernel backend
    "data.decode_backend": "data.decoder",  # dali | torchvision | pil
}


def config_names():
    """The packaged config names (``load_config`` accepts these)."""
    files = resources.files("unit_fast").joinpath(CONFIG_DIR).iterdir()
    return sorted(f.name[:-5] for f in files if f.name.endswith(".yaml") and f.name != "defaults.yaml")


def _read(name_or_path):
    if name_or_path.endswith((".yaml", ".yml")) or os.sep in name_or_path:
        path = os.path.expanduser(name_or_path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"config file {name_or_path!r} does not exist")
        with open(path) as f:
            text, here = f.read(), os.path.dirname(os.path.abspath(path))
    else:
        res = resources.files("unit_fast").joinpath(CONFIG_DIR, f"{name_or_path}.yaml")
        if not res.is_file():
            raise ValueError(f"unknown config {name_or_path!r}; packaged configs: {', '.join(config_names())}, "
                             "or pass a path to a .yaml file")
        text, here = res.read_text(), None
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise ValueError(f"config {name_or_path!r} must be a mapping at the top level")
    return data, here


# Sections open although their default is not empty: a head and its [CLS] setting per dataset,
# for any dataset name (the dataset's kind checks a head's keys: ``tasks/resolve.py``).
OPEN_SECTIONS = frozenset({"model.heads.detection", "model.heads.vl", "model.heads.glue",
                           "model.keep_only_bert_cls.vl", "model.keep_only_bert_cls.glue"})


def _open_maps(defaults, path=""):
    """Dotted paths of the open maps: the sections whose default is ``{}`` (any key allowed),
    and ``OPEN_SECTIONS``."""
    found = set(OPEN_SECTIONS) if not path else set()
    for key, value in defaults.items():
        dotted = f"{path}.{key}" if path else str(key)
        if isinstance(value, dict):
            found |= {dotted} if not value else _open_maps(value, dotted)
    return found


def _merge(into, new, path, open_map=False, open_maps=frozenset()):
    """Merge ``new`` onto ``into`` in place; unknown keys raise unless inside an open map (a
    section whose default is ``{}``: it stays open after a config fills it)."""
    for key, value in new.items():
        dotted = f"{path}.{key}" if path else str(key)
        if key not in into:
            if dotted in RENAMED:
                raise ValueError(f"config key {dotted!r} was renamed: use {RENAMED[dotted]!r}")
            if not open_map:
                raise ValueError(f"unknown config key {dotted!r}")
            into[key] = copy.deepcopy(value)
            continue
        current = into[key]
        if isinstance(current, dict) and isinstance(value, dict):
            _merge(current, value, dotted, open_map or not current or dotted in open_maps, open_maps)
        elif isinstance(current, dict) and value is not None and not open_map and current:
            raise ValueError(f"config key {dotted!r} is a section; got {value!r}")
        else:
            into[key] = copy.deepcopy(value)


def _load_chain(name_or_path, seen):
    data, here = _read(name_or_path)
    base = data.pop("base", None)
    chain = []
    if base is not None:
        if base in seen:
            raise ValueError(f"config {name_or_path!r}: circular base {base!r}")
        if here is not None and (base.endswith((".yaml", ".yml")) and not os.path.isabs(base)):
            base = os.path.join(here, base)
        chain = _load_chain(base, seen | {base})
    return chain + [(name_or_path, data)]


def parse_override(text):
    """``"a.b.c=value"`` -> ``(["a", "b", "c"], value)``; a clear error if malformed."""
    if "=" not in text:
        raise ValueError(f"bad override {text!r}: expected dotted.key=value")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ValueError(f"bad override {text!r}: empty key part")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ValueError(f"bad override {text!r}: value is not valid YAML ({exc})") from None
    if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string; a number is meant
        try:
            value = float(value)
        except ValueError:
            pass
    return key.split("."), value


def migrate_renamed(cfg):
    """Move the ``RENAMED`` keys of a stored config (``cfg``, a nested dict, changed in place) to
    their new names; returns ``[(old, new), ...]`` of the keys moved."""
    moved = []
    for old, new in RENAMED.items():
        *old_parents, old_key = old.split(".")
        *new_parents, new_key = new.split(".")
        section = cfg
        for part in old_parents:
            section = section.get(part) if isinstance(section, dict) else None
        if not isinstance(section, dict) or old_key not in section:
            continue
        value = section.pop(old_key)
        target = cfg
        for part in new_parents:
            target = target.setdefault(part, {})
        target.setdefault(new_key, value)
        moved.append((old, new))
    return moved


def load_config(name_or_path, overrides=()):
    """The merged config dict of a packaged config name or a YAML path, plus ``overrides``."""
    cfg, _ = _read("defaults")
    cfg.pop("base", None)
    open_maps = _open_maps(cfg)
    for name, data in _load_chain(name_or_path, {name_or_path}):
        try:
            _merge(cfg, data, "", open_maps=open_maps)
        except ValueError as exc:
            raise ValueError(f"config {name!r}: {exc}") from None
    for text in overrides:
        keys, value = parse_override(text)
        nested = value
        for k in reversed(keys):
            nested = {k: nested}
        _merge(cfg, nested, "", open_maps=open_maps)
    cfg["config_name"] = os.path.splitext(os.path.basename(name_or_path))[0]
    return cfg


def config_summary(name):
    """The first sentence of a packaged config's leading ``#`` comment block, or "" without one."""
    import re

    lines = []
    for line in resources.files("unit_fast").joinpath(CONFIG_DIR, f"{name}.yaml").read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    text = " ".join(s for s in lines if s)
    return re.split(r"(?<=\.)\s", text, maxsplit=1)[0] if text else ""


def packaged_configs_epilog(width=79):
    """The help epilog of the CLIs that take ``--config``: every packaged config name, each with
    its ``config_summary`` wrapped below it to ``width`` columns (pre-formatted: for
    ``argparse.RawDescriptionHelpFormatter``)."""
    import textwrap

    out = ["packaged configs (--config NAME; --config also takes a path to a .yaml file):"]
    for name in config_names():
        out.append(f"  {name}")
        summary = config_summary(name)
        if summary:
            out.extend(textwrap.wrap(summary, width, initial_indent=" " * 6, subsequent_indent=" " * 6,
                                     break_long_words=False, break_on_hyphens=False))
    return "\n".join(out)
