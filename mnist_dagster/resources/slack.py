"""Slack alerts: dagster-slack's `SlackResource`, plus where to post, which API to call and where runs are shown.

Without `SLACK_BOT_TOKEN` the code location still loads and alerting is simply off (`configured` is
False); with it, the token reaches the resource only through `dg.EnvVar`, so the UI shows the
variable's name, never its value.
"""

import os
from collections.abc import Mapping

import dagster as dg
from dagster_slack import SlackResource
from pydantic import Field
from slack_sdk import WebClient

DEFAULT_CHANNEL = "#ml-alerts"
DEFAULT_WEBSERVER_URL = "http://localhost:3000"


class SlackAlerts(SlackResource):
    """Posts alert messages to one channel; `token` may be empty, which means alerts are off."""

    token: str = Field(default="", description="Slack bot token (from SLACK_BOT_TOKEN); empty turns alerts off.")
    channel: str = Field(default=DEFAULT_CHANNEL, description="Channel the alerts go to (SLACK_CHANNEL).")
    api_url: str = Field(default="", description="Slack Web API base URL (SLACK_API_URL); empty means Slack's own.")
    webserver_url: str = Field(
        default=DEFAULT_WEBSERVER_URL, description="Dagster UI base URL used in run links (DAGSTER_WEBSERVER_URL)."
    )
    timeout_seconds: int = Field(default=10, description="Per request; a sensor tick must not hang on a slow Slack.")

    @property
    def configured(self) -> bool:
        return bool(self.token.strip())

    def get_client(self) -> WebClient:
        """slack_sdk's client on `api_url` (dagster-slack's own ignores any base URL)."""
        return WebClient(token=self.token, base_url=self.api_url or WebClient.BASE_URL, timeout=self.timeout_seconds)

    def post(self, text: str) -> None:
        """One message to `channel`; raises slack_sdk / network errors so the caller can retry on its next tick."""
        self.get_client().chat_postMessage(channel=self.channel, text=text, unfurl_links=False, mrkdwn=True)

    def run_url(self, run_id: str) -> str:
        return f"{self.webserver_url.rstrip('/')}/runs/{run_id}"


def slack_alerts(env: Mapping[str, str] = os.environ) -> SlackAlerts:
    """The `slack` resource from the environment: SLACK_BOT_TOKEN, SLACK_CHANNEL, SLACK_API_URL, DAGSTER_WEBSERVER_URL.

    The token is wired as `dg.EnvVar` only when it is set: an unset `EnvVar` fails resource
    initialisation, and a missing token must mean "alerts off", not "sensor broken".
    """
    return SlackAlerts(
        token=dg.EnvVar("SLACK_BOT_TOKEN") if env.get("SLACK_BOT_TOKEN", "").strip() else "",
        channel=env.get("SLACK_CHANNEL", "").strip() or DEFAULT_CHANNEL,
        api_url=env.get("SLACK_API_URL", "").strip(),
        webserver_url=env.get("DAGSTER_WEBSERVER_URL", "").strip() or DEFAULT_WEBSERVER_URL,
    )
