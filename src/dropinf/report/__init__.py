"""Look at the answer: an HTML report of an attribution run, and the guidance shown with it.

    attr.report(query_loader, "report.html", k=10, tokenizer=tok)    # or: dropinf report ENTRY ...

``build.attribution_report`` gathers the data, ``html.write_html`` writes one self-contained
file, ``content`` renders examples (text, images, labels), ``diagnose`` flags degenerate runs.
"""

from .page import attribution_report
from .content import default_render
from .diagnose import SIGN, Finding, diagnose

__all__ = ["attribution_report", "default_render", "diagnose", "Finding", "SIGN"]
