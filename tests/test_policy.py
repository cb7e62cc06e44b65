"""The transparent content policy: off by default; a refusal names the rule and the match."""

from __future__ import annotations

import pytest
import requests

from serving.config import ConfigError, ContentPolicyConfig, PolicyRule, load_config
from serving.policy import ContentPolicy


def policy(*rules: PolicyRule) -> ContentPolicy:
    return ContentPolicy(ContentPolicyConfig(enabled=True, rules=list(rules)))


def test_off_by_default():
    config = load_config(None, environ={})
    assert config.content_policy.enabled is False
    assert ContentPolicy(config.content_policy).check("anything at all", "prompt") is None


def test_terms_match_whole_words_in_any_case_and_report_the_span():
    rules = policy(PolicyRule(id="no-brands", terms=["acme"], message="no trademarks"))
    violation = rules.check("a fox by the ACME factory", "prompt")
    assert (violation.rule_id, violation.start, violation.end, violation.matched) == ("no-brands", 13, 17, "ACME")
    assert violation.describe() == ("prompt matched content rule 'no-brands' at characters 13-17 ('ACME'): "
                                    "no trademarks")
    assert rules.check("acmes and placements are fine", "prompt") is None


def test_regex_rules_and_earliest_match_wins():
    rules = policy(PolicyRule(id="late", terms=["zebra"]), PolicyRule(id="ids", regex=r"\d{3}-\d{2}-\d{4}"))
    violation = rules.check("id 123-45-6789 then a zebra", "prompt")
    assert (violation.rule_id, violation.matched) == ("ids", "123-45-6789")


def test_bad_rules_are_config_errors(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text('content_policy:\n  enabled: true\n  rules:\n    - id: broken\n      regex: "("\n')
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert "rule 'broken': regex does not compile" in info.value.problems[0]
    assert info.value.problems[0].startswith(f"{path}:4:")


def test_live_refusal_names_rule_and_span(service):
    response = requests.post(f"{service.url}/v1/videos", json={"prompt": "a cat and a forbiddenword", "seconds": "1",
                                                               "size": "64x64"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "content_policy_violation" and error["param"] == "prompt"
    assert "'test-blocked-term'" in error["message"] and "characters 12-25" in error["message"]
    assert "kept out by the tests" in error["message"]
    # A harmless prompt next to it goes through.
    fine = requests.post(f"{service.url}/v1/videos", json={"prompt": "a cat and a forbidden word", "seconds": "1",
                                                           "size": "64x64", "num_inference_steps": 1})
    assert fine.status_code == 200
