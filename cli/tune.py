"""``specstream tune``: choose a model's draft tree on this device, without a full benchmark."""

from __future__ import annotations

import functools

import typer
from typing_extensions import Annotated

from mlx_specstream.cli.bench import DataOpt, JsonFileOpt
from mlx_specstream.cli.common import MaxTokensOpt, ModelOpt, check_output_files, print_json, status

NumSamplesOpt = Annotated[int, typer.Option(
    "--num-samples", min=1, help="Calibration prompts: the first N examples of --data.")]
NoSaveOpt = Annotated[bool, typer.Option(
    "--no-save", help="Report the choice without writing it into the model's config.json.")]


def tune(
    data: DataOpt,
    model: ModelOpt = None,
    num_samples: NumSamplesOpt = 8,
    max_tokens: MaxTokensOpt = 128,
    no_save: NoSaveOpt = False,
    json_file: JsonFileOpt = None,
) -> None:
    """Choose the draft tree that decodes fastest on this device and save it as the model's default.

    Measures step cost per tree size and the streams' acceptance, times the most promising trees
    in generations from the calibration prompts (what `specstream bench --tune` does before its
    benchmark), then writes the winner into the model's config.json (unless --no-save).

    Example: specstream tune --model DIR --data ../shared/data/e2e/devset.csv.gz --num-samples 16
    """
    from mlx_specstream.bench import report, run_tune

    check_output_files(json_file)
    quiet = json_file is not None and str(json_file) == "-"
    result = run_tune(model, data, num_samples=num_samples, max_tokens=max_tokens, save=not no_save,
                      status=functools.partial(status, quiet=quiet))
    if quiet:
        print_json(result)
        return
    typer.echo(report.tune_markdown(result))
    if json_file is not None:
        report.write_json(result, json_file)
