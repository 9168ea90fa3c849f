"""``free-sim``: a whole federation on one machine, from a named study preset.

    free-sim run [--preset demo|quick|tiny|paper] [--clients N] [--dataset SPEC] [--arch conv4|...|mix]
                 [--iterations N] [--episodes N] [--transport flower|inprocess] [--out DIR] ...

The study (:mod:`free_dfml.common.presets`) is run by :func:`free_dfml.sim.study.run_study`: through
Flower's simulation engine by default (``flwr run`` on a local simulation federation, the deployment's
ServerApp and ClientApp), or in this process without Flower (``--transport inprocess``).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from free_dfml.common.cli import CliError, run_cli

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Simulate a FREE federation on one machine (Flower's simulation engine).")


@app.callback()
def _root() -> None:
    """Simulate a FREE federation on one machine (Flower's simulation engine)."""


@app.command()
def run(
    preset: str = typer.Option("demo", "--preset",
                               help="study preset: tiny | demo | quick | paper (aliases: smoke=tiny, full=paper)"),
    clients: Optional[int] = typer.Option(None, "--clients", min=1, help="number of virtual clients (default: preset's)"),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="glyphs | DIR | cifar-fs:PATH (default: preset's)"),
    classes_per_client: Optional[int] = typer.Option(None, "--classes-per-client", min=2),
    arch: Optional[str] = typer.Option(None, "--arch", help="conv4 | resnet10 | resnet18 | mix (default: preset's)"),
    iterations: Optional[int] = typer.Option(None, "--iterations", min=1, help="FREE iterations (default: preset's)"),
    out: Optional[Path] = typer.Option(None, "--out", help="output folder (default runs/sim-<preset>)"),
    episodes: Optional[int] = typer.Option(None, "--episodes", min=1, help="meta-test episodes per shot"),
    client_epochs: Optional[int] = typer.Option(None, "--client-epochs", min=1),
    client_augment: Optional[str] = typer.Option(None, "--client-augment",
                                                 help="none | flip | crop | crop+flip (default: preset's)"),
    dp_epsilon: Optional[float] = typer.Option(None, "--dp-epsilon", help="clients train with DP-SGD to this epsilon (free-client train's DP recipe)"),
    transport: str = typer.Option("flower", "--transport",
                                  help="flower (Flower's simulation engine) | inprocess (same study, no Flower)"),
    device: str = typer.Option("cpu", "--device", help="auto | cpu | cuda (the server's trainer)"),
    threads: int = typer.Option(0, "--threads", min=0,
                                help="torch threads of FREE's training (0: torch's default, one per core); "
                                     "results are identical only at the same thread count"),
    seed: int = typer.Option(0, "--seed", help="data, client plan, client training and FREE seed"),
) -> None:
    """Run the simulated federation and print the evaluation table."""
    from free_dfml.common.models import ARCHITECTURES
    from free_dfml.common.presets import study as make_study
    if arch is not None and arch != "mix" and arch not in ARCHITECTURES:
        raise CliError(f"--arch must be one of {', '.join(ARCHITECTURES)} or mix, got {arch!r}")
    if dp_epsilon is not None and dp_epsilon <= 0:
        raise CliError("--dp-epsilon must be > 0")
    from free_dfml.client.train import AUGMENTATIONS
    if client_augment is not None and client_augment not in AUGMENTATIONS:
        raise CliError(f"--client-augment must be one of {', '.join(AUGMENTATIONS)}, got {client_augment!r}")
    if transport not in ("flower", "inprocess"):
        raise CliError(f"--transport must be flower or inprocess, got {transport!r}")
    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        raise CliError(f"--device must be auto, cpu or cuda, got {device!r}")
    over: dict = {"seed": seed}
    data = {k: v for k, v in (("dataset", dataset),) if v is not None}
    cl = {k: v for k, v in (("count", clients), ("classes_per_client", classes_per_client), ("arch", arch),
                            ("epochs", client_epochs), ("augment", client_augment)) if v is not None}
    if data:
        over["data"] = data
    if cl:
        over["clients"] = cl
    if iterations is not None:
        over["free"] = {"schedule": {"iterations": iterations}}
    if episodes is not None:
        over["evaluation"] = {"episodes": episodes}
    try:
        st = make_study(preset, **over)
    except ValueError as e:
        raise CliError(f"--preset: {e}" if "preset" in str(e) else str(e)) from None
    out_dir = out or Path(f"runs/sim-{st.name}")
    from free_dfml.common.datasets import DataError
    from free_dfml.sim.study import run_study
    try:
        doc = run_study(st, out_dir, transport=transport, device=device, threads=threads, dp_epsilon=dp_epsilon)
    except DataError as e:
        raise CliError(str(e)) from None
    except (ValueError, RuntimeError) as e:
        raise CliError(str(e).splitlines()[0] if str(e) else type(e).__name__, 1) from None
    print(f"wrote {out_dir}/results.md, results.json, metrics.jsonl"
          + (", accuracy.png" if doc["artefacts"]["plot"] else "")
          + (", recovered.png" if doc["artefacts"]["grid"] else ""))


def main() -> None:
    sys.exit(run_cli(app, "free-sim"))


if __name__ == "__main__":
    main()
