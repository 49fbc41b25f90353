"""Look at the answer: an HTML report of an attribution run, and the guidance shown with it.

    attr.report(query_loader, "report.html", k=10, tokenizer=tok)    # or: dropinf report ENTRY ...

``page.attribution_report`` gathers the data, ``html.write_html`` writes one self-contained
file (its options: ``options.ReportOptions``), ``content`` renders examples (text, images, labels), ``diagnose`` flags degenerate runs.
"""

from .options import ReportOptions
from .page import attribution_report
from .content import default_render
from .diagnose import SIGN, Finding, diagnose

__all__ = ["attribution_report", "ReportOptions", "default_render", "diagnose", "Finding", "SIGN"]
