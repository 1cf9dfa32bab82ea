"""Make the README's dashboard screenshots from the demo after a couple of days of syncs.

In a temporary folder: the demo warehouse and config, 24 syncs two hours apart (each run's
`:now` moves the rules' time windows, and a few customers' lifetime value moves between
syncs), delivered to the demo's jsonl file; then the dashboard is served on a loopback port
and Debian's headless Chromium takes `/` and one audience page.

    python demo/screenshots.py [--out docs] [--chromium chromium]
"""

from __future__ import annotations

import argparse
import random
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path

import yaml

from audience_sync.config import load_config
from audience_sync.drain import drain
from audience_sync.leases import hold_all
from audience_sync.runner import run_computation
from audience_sync.state.store import Store
from audience_sync.ui.app import Dashboard
from audience_sync.ui.server import UIServer

HERE = Path(__file__).resolve().parent
SYNCS = 24
EVERY = timedelta(hours=2)
AUDIENCE = "high_value"


def nudge(warehouse: Path, rng: random.Random) -> None:
    """Some customers spend, some get refunds: high_value gains and loses a few members."""
    db = sqlite3.connect(warehouse)
    ids = [row[0] for row in db.execute("SELECT id FROM users ORDER BY id")]
    for uid in rng.sample(ids, 60):
        db.execute("UPDATE users SET lifetime_value = lifetime_value * ? WHERE id = ?",
                   (rng.choice((0.4, 0.7, 1.6, 2.5)), uid))
    db.commit()
    db.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE.parent / "docs")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "chromium")
    args = parser.parse_args()
    sys.path.insert(0, str(HERE))
    from make_warehouse import build  # the demo's own generator, beside this file

    now = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    first = now - EVERY * (SYNCS - 1)
    rng = random.Random(20261130)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "demo").mkdir()
        build(folder / "demo" / "warehouse.db", first.replace(hour=0))
        document = yaml.safe_load((HERE.parent / "config.yaml").read_text())
        (folder / "config.yaml").write_text(yaml.safe_dump(document))
        config = load_config(folder / "config.yaml")
        store = Store(config.state_db)
        store.upgrade()
        store.register(config.computations, first)
        for i in range(SYNCS):
            at = first + EVERY * i
            if i:
                nudge(folder / "demo" / "warehouse.db", rng)
            for comp in config.computations:
                run_computation(store, config, comp, clock=lambda at=at: at)
            with ExitStack() as stack:
                leases = hold_all(stack, store, [c.key for c in config.computations], "demo")
                drain(store, config, leases, clock=lambda at=at: at + timedelta(minutes=1))
        app = Dashboard(store, config, None, clock=lambda: now + timedelta(minutes=12))
        server = UIServer(app, "127.0.0.1", 0).start()
        args.out.mkdir(parents=True, exist_ok=True)
        try:
            for name, path in (("dashboard.png", "/"),
                               ("dashboard-audience.png", f"/audiences/{AUDIENCE}")):
                subprocess.run(
                    [args.chromium, "--headless", "--no-sandbox", "--disable-gpu",
                     "--hide-scrollbars", f"--user-data-dir={folder / 'profile'}",
                     f"--screenshot={args.out / name}", "--window-size=1280,900",
                     f"http://127.0.0.1:{server.port}{path}"],
                    check=True, capture_output=True, timeout=120)
                print(f"{args.out / name}: {path}")
        finally:
            server.stop()
            store.dispose()


if __name__ == "__main__":
    main()
