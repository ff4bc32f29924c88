"""Validation as a Prefect task: the pipeline stops here, before anything uses bad data."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_markdown_artifact

from flows.validation.run import ValidationReport, validate_dataset


class ValidationFailed(RuntimeError):
    """Raised so the flow run ends Failed at validation and no later task runs."""

    def __init__(self, report: ValidationReport):
        super().__init__(f"{len(report.failures)} validation rule(s) failed for {report.directory}:\n{report.format()}")
        self.report = report


def summary_markdown(report: ValidationReport) -> str:
    lines = [f"# Validation {'passed' if report.success else 'FAILED'}: `{report.directory}`", "",
             "| table | rows |", "|---|---|"]
    lines += [f"| {t} | {n:,} |" for t, n in report.rows.items()]
    if report.failures:
        lines += ["", "| table | column | rule | failing | examples |", "|---|---|---|---|---|"]
        lines += [f"| {f.table} | {f.column} | {f.rule} | {f.fraction:.2%} | {', '.join(map(repr, f.examples[:5]))} |"
                  for f in report.failures]
    lines += ["", f"Data Docs: `{report.docs_path}`"]
    return "\n".join(lines)


@task(name="validate", retries=0, timeout_seconds=3600)
def validate_task(directory: str, docs_dir: str | None = None) -> dict:
    report = validate_dataset(directory, docs_dir=docs_dir)
    create_markdown_artifact(key="validation-summary", markdown=summary_markdown(report),
                             description="Great Expectations validation of the contract tables")
    if not report.success:
        raise ValidationFailed(report)
    return {"rows": report.rows, "docs_path": report.docs_path, "seconds": report.seconds}
