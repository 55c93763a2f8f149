"""The web chat page in headless Chromium (Debian's build, driven by Playwright): goal -> live steps -> answer -> feedback."""

from __future__ import annotations

import shutil

import pytest

from selftune.memory.episodes import EpisodeStore

from daemon_harness import DaemonProcess

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture()
def daemon(tmp_path):
    proc = DaemonProcess(tmp_path / "data", delay_s=0.3).start()
    yield proc
    assert proc.stop() == 0, proc.log()


def test_chat_page_submits_streams_answers_and_records_feedback(daemon, tmp_path):
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(f"{daemon.url}/#token={daemon.token}")
            assert "#token" not in page.url  # the page moves the token out of the address bar

            page.fill("#goal-input", "What is 6*7? Use the calculator.")
            page.click("#submit-goal")
            card = page.locator(".card.goal").first
            # Steps appear live, before the answer: the plan and the calculator call.
            card.locator(".step.tool_call").first.wait_for(timeout=60_000)
            assert "calculator" in card.locator(".step.tool_call").first.inner_text()
            page.wait_for_function("document.querySelector('.card.goal .answer').textContent.length > 0",
                                   timeout=60_000)
            assert card.locator(".answer").inner_text() == "42"
            assert card.locator(".step.plan").count() == 1

            card.locator(".thumb-up").click()
            status = card.locator(".feedback-status")
            status.wait_for(timeout=30_000)
            page.wait_for_function("document.querySelector('.feedback-status').textContent.includes('recorded')",
                                   timeout=30_000)
            assert "recorded +1" in status.inner_text()

            page.click("#tab-reports")
            page.wait_for_function("document.getElementById('reports').textContent.length > 0", timeout=30_000)
            assert "No retraining reports yet" in page.locator("#reports").inner_text()
            assert not errors, errors
            goal_id = card.get_attribute("data-goal")
        finally:
            browser.close()

    record = daemon.goal(goal_id)
    assert record["status"] == "done" and record["answer"] == "42"
    with EpisodeStore(daemon.data_dir / "episodes.sqlite3") as store:
        episode = store.get(record["episode_id"])
    assert [reward.value for reward in episode.rewards if reward.source == "user"] == [1.0]
