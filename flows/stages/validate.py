"""Validation, the first stage: Great Expectations over every table; the pipeline stops here on bad data."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact

from flows.caching import code_digest, dataset_digest, digest
from flows.stages.common import HOUR, MINUTE, value

if TYPE_CHECKING:
    from flows.validation.run import ValidationReport


class ValidationFailed(RuntimeError):
    """Raised so the flow run ends Failed at validation and no later task runs."""

    def __init__(self, report: ValidationReport):
        super().__init__(f"{len(report.failures)} validation rule(s) failed for {report.directory}:\n{report.format()}")
        self.report = report


def summary_markdown(report: ValidationReport) -> str:
    lines = [f"# Validation {'passed' if report.success else 'FAILED'}: `{report.directory}`", "",
             "| table | rows |", "|---|---|"]
    lines += [f"| {t} | {n:,} |" for t, n in report.rows.items()]
    if report.label_nulls:  # missing labels are masked out of their task, never negatives: how many there are
        lines += ["", "| label | missing | max_null_rate |", "|---|---|---|"]
        lines += [f"| {c} | {share:.2%} | {limit:.2%} |" for c, (share, limit) in report.label_nulls.items()]
    if report.failures:
        lines += ["", "| table | column | rule | failing | examples |", "|---|---|---|---|---|"]
        lines += [f"| {f.table} | {f.column} | {f.rule} | {f.fraction:.2%} | {', '.join(map(repr, f.examples[:5]))} |"
                  for f in report.failures]
    if report.docs_path:  # none when the manifest failed before any table was judged
        lines += ["", f"Data Docs: `{report.docs_path}`"]
    return "\n".join(lines)


@task(name="validate", retries=0, timeout_seconds=3600)
def validate_task(directory: str, docs_dir: str | None = None) -> dict:
    from flows.validation.run import validate_dataset

    report = validate_dataset(directory, docs_dir=docs_dir)
    create_markdown_artifact(key="validation-summary", markdown=summary_markdown(report),
                             description="Great Expectations validation of the contract tables")
    if not report.success:
        raise ValidationFailed(report)
    return {"rows": report.rows, "docs_path": report.docs_path, "seconds": report.seconds}


def validation_key(directory: str, docs_dir: str | None = None) -> str:
    return "mtlrec-validate-" + digest(str(Path(directory).resolve()), docs_dir, dataset_digest(directory),
                                       code_digest("flows/validation", "models/contract/tables.py"))


def validation_outputs_exist(directory: str, docs_dir: str | None = None) -> bool:
    root = Path(docs_dir) if docs_dir else Path(directory) / "_gx"
    return any(root.rglob("index.html")) if root.is_dir() else False


def validate_cache_key(context, parameters: dict) -> str:
    return validation_key(parameters["directory"], parameters.get("docs_dir"))


@flow(name="validate-data", timeout_seconds=HOUR)
def validate_flow(data: str) -> dict:
    """Great Expectations over every table; raises ValidationFailed, so nothing after it runs on bad data."""
    task_ = validate_task.with_options(cache_key_fn=validate_cache_key, persist_result=True,
                                       refresh_cache=not validation_outputs_exist(data),
                                       timeout_seconds=30 * MINUTE)
    cached: list[str] = []
    result = value(task_(data, return_state=True), "validate", cached)
    if cached:  # the task published its summary on the run that computed it; say so on this run too
        create_markdown_artifact(
            key="validation-summary", description="Great Expectations validation of the contract tables",
            markdown=f"# Validation passed: `{data}` (cached: the tables are byte-identical to a validated run)\n\n"
                     + "\n".join(f"- {t}: {n:,} rows" for t, n in result["rows"].items())
                     + f"\n\nData Docs: `{result['docs_path']}`")
    return {**result, "cached": bool(cached)}
