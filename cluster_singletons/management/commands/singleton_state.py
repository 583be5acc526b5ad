"""``python manage.py singleton_state show|export|import NAME [FILE]``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from cluster_singletons import control
from cluster_singletons.errors import StateImportRefused
from cluster_singletons.management.base import clear_errors


class Command(BaseCommand):
    help = (
        "show NAME: the stored state with its versions and status; export NAME [FILE]: "
        '{"schema_version": n, "value": ...} as JSON (stdout by default); import NAME FILE '
        "('-' for stdin): replace the value after decoding it through the model's upgrades "
        "(a bare value is read at the model's version; a newer version, an unknown field or "
        "an invalid value is refused and nothing is written; the old value goes to history). "
        "Unknown names exit 2."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("action", choices=["show", "export", "import"])
        parser.add_argument("name", help="The singleton's name.")
        parser.add_argument("file", nargs="?", help="export: output file; import: input file.")
        parser.add_argument("--note", default="", help="import: why, kept with the history.")

    @clear_errors
    def handle(self, *args: Any, **options: Any) -> None:
        action, name, file = options["action"], options["name"], options["file"]
        if action == "import":
            if not file:
                raise ValueError("import needs a FILE (or '-' for stdin)")
            try:
                text = sys.stdin.read() if file == "-" else Path(file).read_text()
            except OSError as exc:
                raise ValueError(f"cannot read {file}: {exc.strerror or exc}") from exc
            try:
                imported = control.import_state(name, text, options["note"])
            except StateImportRefused as exc:
                raise CommandError(f"refused, nothing was written: {exc}") from exc
            self.stdout.write(f"imported into {name!r}: {imported.model_dump_json()}")
            return
        if action == "export":
            exported = control.export_state(name)
            if file:
                Path(file).write_text(exported + "\n")
            else:
                self.stdout.write(exported)
            return
        row = control.state_row(name)
        value = control.singleton_store(name).model().model_dump_json()
        if row is None:
            self.stdout.write(f"{name}: nothing stored (defaults) {value}")
            return
        shown = {
            "key": row.key,
            "version": row.version,
            "schema_version": row.schema_version,
            "status": row.status,
            "problem": row.problem,
            "updated_at": row.updated_at,
            "updated_epoch": row.updated_epoch,
            "value": _decoded(row.value),
        }
        self.stdout.write(json.dumps(shown, default=str, indent=2))


def _decoded(text: str) -> Any:
    """The stored JSON as JSON; text that does not parse (a damaged row) as it is."""
    try:
        return json.loads(text)
    except ValueError:
        return text
