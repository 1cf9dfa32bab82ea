from __future__ import annotations

import pytest

from audience_sync.keys import check_key, derive_key, reserved_key_reason


@pytest.mark.parametrize(("name", "key"), [
    ("Order Completed Last 30 Days", "order_completed_last_30_days"),
    ("Order Completed Last 30days", "order_completed_last_30days"),
    ("High-Value Users (EU)", "high_value_users_eu"),
    ("Café Lovers", "cafe_lovers"),
    ("trialUsers2024", "trial_users2024"),
    ("VIP  users!!", "vip_users"),
    ("Straße Fans", "strasse_fans"),
    ("  leading and trailing  ", "leading_and_trailing"),
    ("HTTPServer Users", "http_server_users"),
    ("Ørsted & Æble", "orsted_aeble"),
    ("a__b--c", "a_b_c"),
    ("30 Day Buyers", "audience_30_day_buyers"),
])
def test_derive_key(name: str, key: str) -> None:
    assert derive_key(name) == key


def test_derive_key_prefix_for_traits() -> None:
    assert derive_key("90d orders", prefix="trait") == "trait_90d_orders"


@pytest.mark.parametrize("name", ["", "!!!", "   ", "日本語"])
def test_name_without_usable_characters(name: str) -> None:
    with pytest.raises(ValueError, match="no letters or digits"):
        derive_key(name)


@pytest.mark.parametrize("key", ["high_value", "a", "a1_b2"])
def test_explicit_key_ok(key: str) -> None:
    assert check_key(key) == key


@pytest.mark.parametrize("key", ["High", "1abc", "_a", "a-b", "a b", "", "a" * 101])
def test_explicit_key_rejected(key: str) -> None:
    with pytest.raises(ValueError):
        check_key(key)


@pytest.mark.parametrize(("key", "field"), [
    ("email", "email"), ("name", "name"), ("title", "title"), ("company_id", "company_id"),
    ("companyid", "company_id"), ("user_id", "user_id"), ("userid", "user_id"),
    ("external_id", "externalId"), ("id", "id"),
])
def test_key_colliding_with_a_contact_field_is_reserved(key: str, field: str) -> None:
    reason = reserved_key_reason(key)
    assert reason is not None and f"contact field {field!r}" in reason


@pytest.mark.parametrize("key", ["email_opt_in", "named_accounts", "high_value", "ids",
                                 "user_segment", "company"])
def test_key_merely_containing_a_contact_field_is_allowed(key: str) -> None:
    assert reserved_key_reason(key) is None
