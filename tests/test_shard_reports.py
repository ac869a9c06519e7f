"""Report parsing (real MIMIC quirks) and the offline tokenizer the shards are built with."""

from __future__ import annotations

import pytest

from lapvqa.reports import ReportError, decode_report, parse_report, report_text
from lapvqa.shard.samples import tokens_for
from lapvqa.tokenizer import encode
from mimic_fixtures import REPORTS


def _text(data: bytes, mode: str = "full") -> str:
    text, _ = decode_report(data)
    return report_text(parse_report(text), mode)


def test_tokenizer_offline_known_ids():
    assert encode("Hello world") == [15496, 995]


def test_banner_dropped_sections_unwrapped():
    t = _text(REPORTS[0])
    assert "FINAL REPORT" not in t
    assert t.splitlines()[0] == "EXAMINATION: CHEST (PA AND LAT)"
    assert ("FINDINGS: There is no focal consolidation, pleural effusion or pneumothorax. "
            "The cardiomediastinal silhouette is normal.") in t.splitlines()
    assert "INDICATION: ___F with cough" in t  # de-identification placeholders are kept
    assert _text(REPORTS[0], "findings-impression") == (
        "FINDINGS: There is no focal consolidation, pleural effusion or pneumothorax. The "
        "cardiomediastinal silhouette is normal.\nIMPRESSION: No acute cardiopulmonary process.")


def test_wet_read_crlf_and_numbered_lists():
    t = _text(REPORTS[1])
    assert "WET READ" not in t and "\r" not in t
    assert t.splitlines() == [
        "HISTORY: Chest pain.",
        "FINDINGS: Heart size is mildly enlarged. There is mild pulmonary vascular congestion.",
        "IMPRESSION: 1. Mild cardiomegaly.", "2. Mild vascular congestion."]


def test_missing_sections_free_text_and_odd_case():
    assert _text(REPORTS[2], "findings-impression").startswith("IMPRESSION: Endotracheal tube")
    free = parse_report(decode_report(REPORTS[3])[0])
    assert "report_no_sections" in free.warnings
    assert _text(REPORTS[3]).startswith("PA and lateral views of the chest were obtained. The lungs")
    with pytest.raises(ReportError) as e:
        _text(REPORTS[3], "findings-impression")
    assert e.value.reason == "report_no_findings_impression"
    assert _text(REPORTS[4], "findings-impression").startswith("FINDINGS: Lungs clear")


def test_non_utf8_kept_with_warning_binary_rejected():
    text, warnings = decode_report(REPORTS[4])
    assert warnings == ["report_non_utf8"] and "patient\u2019s" in text
    with pytest.raises(ReportError) as e:
        decode_report(bytes(range(256)) * 4)
    assert e.value.reason == "report_undecodable"
    with pytest.raises(ReportError) as e:
        report_text(parse_report("   \n\n FINAL REPORT\n  \n"))
    assert e.value.reason == "report_empty"


def test_header_lookalikes_are_not_split():
    t = _text(b" FINDINGS: Tube at 10:30 seen. Note: stable.\n IMPRESSION: ok\n")
    assert t.splitlines() == ["FINDINGS: Tube at 10:30 seen. Note: stable.", "IMPRESSION: ok"]


def test_truncation_keeps_tokens_equal_to_text():
    long = " ".join(["pneumothorax cardiomegaly"] * 200)
    text, tokens, truncated, full = tokens_for(long, 37)
    assert truncated and full > 37 and len(tokens) <= 37
    assert tokens == encode(text) and long.startswith(text)
    short = tokens_for("No acute process.", 37)
    assert short[2] is False and short[1] == encode("No acute process.")
