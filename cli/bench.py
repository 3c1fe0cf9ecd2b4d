"""``specstream bench``: speculative streaming vs autoregressive decoding (and baselines) on a data file."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Optional

import typer
from typing_extensions import Annotated

from mlx_specstream.cli.common import (
    MaxTokensOpt,
    ModelOpt,
    SeedOpt,
    StreamsOpt,
    TempOpt,
    TreeOpt,
    check_output_files,
    print_json,
    progress,
    status,
)


DataOpt = Annotated[Path, typer.Option(
    "--data", "-d", show_default=False,
    help="E2E CSV, DialogSum JSONL or {'prompt','reference'} JSONL (.gz accepted).")]
NumSamplesOpt = Annotated[Optional[int], typer.Option(
    "--num-samples", min=1, show_default=False, help="Use the first N examples (default: all).")]
RepeatsOpt = Annotated[int, typer.Option(
    "--repeats", "-r", min=1, help="Timed passes over the prompts; medians are reported.")]
BaselinesOpt = Annotated[Optional[str], typer.Option(
    "--baselines", show_default=False, help="Comma list of mlx-lm, lookup, draft:DIR.")]
NumDraftOpt = Annotated[int, typer.Option(
    "--num-draft", min=1, help="Draft tokens per step of the lookup and draft:DIR baselines.")]
JsonFileOpt = Annotated[Optional[Path], typer.Option(
    "--json", show_default=False, help="Write the results as JSON to FILE ('-': to stdout, no table).")]
PlotOpt = Annotated[Optional[Path], typer.Option(
    "--plot", show_default=False, help="Write a PNG plot (speedup vs tree size with --tune); needs matplotlib.")]
TuneOpt = Annotated[bool, typer.Option(
    "--tune", help="Measure step cost and acceptance, time the most promising trees in generations from the "
    "calibration prompts, save the fastest as the model's default tree, then benchmark with it.")]
TuneDataOpt = Annotated[Optional[Path], typer.Option(
    "--tune-data", show_default=False,
    help="Calibration data for --tune (default: --data; a separate split is less optimistic).")]
TuneSamplesOpt = Annotated[int, typer.Option("--tune-samples", min=1, help="Calibration prompts for --tune.")]


def bench(
    data: DataOpt,
    model: ModelOpt = None,
    num_samples: NumSamplesOpt = None,
    max_tokens: MaxTokensOpt = 128,
    temp: TempOpt = 0.0,
    tree: TreeOpt = None,
    repeats: RepeatsOpt = 3,
    baselines: BaselinesOpt = None,
    num_draft: NumDraftOpt = 4,
    seed: SeedOpt = None,
    json_file: JsonFileOpt = None,
    plot_file: PlotOpt = None,
    tune: TuneOpt = False,
    tune_data: TuneDataOpt = None,
    tune_samples: TuneSamplesOpt = 8,
    streams: StreamsOpt = None,
) -> None:
    """Benchmark speculative streaming against autoregressive decoding of the same weights.

    Modes interleaved per prompt, repeated, medians; a markdown table of decode tokens/s, speedup,
    tokens per step, latency, peak memory, identical outputs and ROUGE or exact match.

    Example: specstream bench --data ../shared/data/e2e/testset_w_refs.csv.gz --num-samples 50 --baselines mlx-lm,lookup
    """
    from mlx_specstream.bench import report, run_bench

    check_output_files(json_file, plot_file)
    quiet = json_file is not None and str(json_file) == "-"
    result = run_bench(
        model, data, num_samples=num_samples, max_tokens=max_tokens, temp=temp, tree=tree, repeats=repeats,
        baselines=baselines, num_draft=num_draft, seed=seed or 0, tune=tune, tune_data=tune_data,
        tune_samples=tune_samples, streams=streams, progress=functools.partial(progress, description="bench"),
        status=functools.partial(status, quiet=quiet),
    )
    if quiet:
        print_json(result)
    else:
        typer.echo(report.markdown(result))
        if json_file is not None:
            report.write_json(result, json_file)
    if plot_file is not None:
        why = report.plot(result, plot_file)
        if why:
            typer.echo(f"warning: {why}", err=True)
