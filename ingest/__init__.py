"""ingest room: turn files into chunks and keep a knowledge base in step with a folder.

    from ingest import ingest
    report = ingest(Path("docs"), "default", load_settings())
    print(report.to_table()); sys.exit(report.exit_code)

See ingest/pipeline.py for the steps (scan.py, diff.py, parse_pool.py, processor.py) and how crashes are survived.
"""
from ingest.pipeline import IngestError, ingest, ingest_files, remove_files
from ingest.report import FileResult, IngestReport, ProgressEvent

__all__ = ["FileResult", "IngestError", "IngestReport", "ProgressEvent", "ingest", "ingest_files", "remove_files"]
