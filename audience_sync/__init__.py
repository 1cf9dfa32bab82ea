"""audience-sync: Engage-style audience sync from your own SQL database.

The parts, each owning one thing and importing only the parts below it:

- `cli/`: parses arguments and formats answers; no SQL, no logic. Commands import what they
  use, so `--help` and `--version` load no database or HTTP library.
- `scheduler` (the daemon) and `health`: ticks on each audience's cadence, leases, a drain's
  explicit stop signal, metrics.
- `runner`: one run of one audience or trait (its kind, the removal guard, dry runs).
- `drain`: the delivery pipeline (a thread per destination, windows of claims, reports).
- `leases`, `ratelimit`: lease logic; the one GCRA rate limiter with its slot sources
  (in memory, or the shared budget in the state store).
- `state/`: the only code that speaks SQL to the state database. `schema`, `store` (engine,
  transactions, migrations), `staging` (snapshot, diff), `apply` (the run transaction),
  `outbox` (claims, outcomes), `leases` (lease and rate-slot statements), `queries`
  (everything a reader asks, as frozen objects), `dashboard` (the dashboard's aggregates),
  `fields` (destinations' custom fields).
  SQLAlchemy errors leave it as StoreError.
- `ui/`: the read-only dashboard (a WSGI app, Jinja2 templates, SVG charts, token rules),
  served by the `ui` command and on the daemon's health port.
- `sources`, `compiler`: the only code that reads source databases (`compiler` turns a
  `where:`/`compute:` definition, parsed by `builder`, into one SELECT).
- `destinations/`: one class per wire format behind the `Destination` Protocol; never touches
  the state database.
- `config`: the validated config file.
- pure modules: `states` (run kinds and statuses as enums), `keys`, `cadence`, `messages`,
  `clock`, `errors`, `urls`, `logs` (the one logging setup), `process`.

tests/test_layout.py keeps SQL inside `state/`.
"""

from __future__ import annotations

__version__ = "0.1.0"
