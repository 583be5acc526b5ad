"""A headless Chromium drives the admin of a live test server while a real cluster runs:
log in, open the dashboard, hand a singleton off, see the page reflect it.

Needs Debian's ``chromium`` and ``chromium-driver`` (CI installs them); skipped without
them unless ``CLUSTER_REQUIRE_BROWSER=1``. The screenshot lands in ``artifacts/``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth.models import User

from cluster_singletons.models import Lease
from project.demo.localcluster import ROOT, Cluster, poll

pytestmark = [
    pytest.mark.browser,
    pytest.mark.multiprocess,
    pytest.mark.django_db(transaction=True),
]

ARTIFACTS = ROOT / "artifacts"
FAST = {"lease_ttl": 3.0, "renew_interval": 0.5, "acquire_interval": 0.2}


@pytest.fixture
def browser() -> Iterator[Any]:
    driver_path = shutil.which("chromedriver")
    if driver_path is None or shutil.which("chromium") is None:
        if os.environ.get("CLUSTER_REQUIRE_BROWSER") == "1":
            pytest.fail("CLUSTER_REQUIRE_BROWSER=1 but chromium/chromedriver are missing")
        pytest.skip("needs Debian's chromium and chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or ""
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    options.add_argument("--window-size=1400,1000")
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.implicitly_wait(0)
    yield driver
    driver.quit()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    started = Cluster(tmp_path, FAST, env={"CLUSTER_DEMO_SINGLETONS": "demo"})
    yield started
    started.stop()


def test_an_operator_hands_a_singleton_off_from_the_dashboard(
    live_server: Any, browser: Any, cluster: Cluster
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    cluster.start(2)
    # Placement spreads the two demo singletons, one per runner: let it settle first.
    poll(
        "one singleton per runner",
        lambda: sorted(cluster.holders("singleton:").values()) == [1, 1],
        timeout=60,
    )
    first = cluster.wait_for_leader("singleton:indexer")
    User.objects.create_superuser("operator", "op@example.com", "correct horse")
    wait = WebDriverWait(browser, 30)

    browser.get(f"{live_server.url}/admin/login/?next=/admin/cluster_singletons/clusterhealth/")
    browser.find_element(By.NAME, "username").send_keys("operator")
    browser.find_element(By.NAME, "password").send_keys("correct horse")
    browser.find_element(By.CSS_SELECTOR, "input[type=submit]").click()
    row = wait.until(
        ec.presence_of_element_located((By.CSS_SELECTOR, 'tr[data-name="singleton:indexer"]'))
    )
    assert f"runner {first.runner_id}" in row.text
    assert "Cluster:" in browser.find_element(By.ID, "cluster-status").text

    row.find_element(By.CSS_SELECTOR, "button[name=hand_off]").click()
    confirm = wait.until(ec.alert_is_present())
    assert "Hand singleton:indexer off" in confirm.text
    confirm.accept()
    wait.until(ec.text_to_be_present_in_element((By.CSS_SELECTOR, ".messagelist"), "requested"))
    second = cluster.wait_for_leader("singleton:indexer", other_than=first, timeout=90)
    assert second.epoch > first.epoch

    def shows_new_leader() -> bool:
        browser.refresh()
        row = browser.find_element(By.CSS_SELECTOR, 'tr[data-name="singleton:indexer"]')
        # Whoever holds it now, as the database says: placement may hand it on again
        # meanwhile (the handoff's target holds two singletons), but never back unseen.
        holder = Lease.objects.get(name="singleton:indexer").holder_id
        return (
            holder is not None
            and f"runner {holder}" in row.text
            and (f"runner {first.runner_id}" not in row.text or holder == first.runner_id)
        )

    poll("the dashboard to show the new leader", shows_new_leader, timeout=30, every=0.5)
    assert not Lease.objects.get(name="singleton:indexer").handoff_requested
    ARTIFACTS.mkdir(exist_ok=True)
    assert browser.save_screenshot(str(ARTIFACTS / "dashboard.png"))
