"""Command-line flags from a config dataclass: one flag per field, its --help text in the field's metadata (as
nanoGPT's configurator.py, the defaults stay beside the fields in grpo.py). The checks of the values live in the
dataclass itself (__post_init__), so a config built in code is checked like the command line's.
"""

import argparse
from dataclasses import field, fields


def flag(default, help, **argparse_options):
    """One field of the config dataclass: its default, its --help text, and argparse options such as choices.
    per_stage=True: the default depends on --stage (None until the dataclass resolves it)."""
    return field(default=default, metadata=dict(help=help, **argparse_options))


def config_parser(config_cls, stage_defaults, description):
    """argparse for a dataclass whose fields carry metadata help=... (and argparse options such as choices). A
    field not given parses to its default; a per-stage one to None, and its help lists every stage's default."""
    p = argparse.ArgumentParser(description=description)
    for f in fields(config_cls):
        name, options = "--" + f.name.replace("_", "-"), dict(f.metadata)
        text = options.pop("help")
        kind = options.pop("type", None)
        if options.pop("per_stage", False):
            by_stage = ", ".join(f"{d[f.name]} in stage {s}" for s, d in stage_defaults.items())
            p.add_argument(name, type=kind, default=None, help=f"{text} (default: {by_stage})")
        elif isinstance(f.default, bool):
            p.add_argument(name, action="store_true", help=text)
        else:
            kind = kind or (type(f.default) if f.default is not None else str)
            # a field without a default says in its own help what not giving it means
            shown = text if f.default is None else f"{text} (default: {f.default})"
            p.add_argument(name, type=kind, default=f.default, help=shown, **options)
    return p
