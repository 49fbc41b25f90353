"""Read the data a report carries (the JSON block the page renders from)."""

import json
import re


def report_data(path) -> dict:
    text = open(path, encoding="utf-8").read()
    m = re.search(r'<script id="data" type="application/json">(.*?)</script>', text, re.S)
    assert m, "no data block in the report"
    return json.loads(m.group(1))
