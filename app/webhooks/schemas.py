from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field


class WebhookOut(BaseModel):
    url: str
    state: Literal["waiting", "pending", "delivered", "failed"] = Field(
        description="waiting: the job has not ended. pending: to be sent (or retried). delivered: a 2xx answer. "
                    "failed: every attempt failed.")
    event: str | None = Field(None, description="job.succeeded, job.failed or job.cancelled.")
    attempts: int = 0
    last_status_code: int | None = None
    last_error: str | None = None
    last_attempt_at: datetime | None = None
    next_attempt_at: datetime | None = None
    delivered_at: datetime | None = None


def webhook_out(callback_url: str | None, delivery) -> WebhookOut | None:
    """The `webhook` object of a job: from its outbox row (an ORM row or a mapping), or waiting if it has none."""
    if not callback_url:
        return None
    if delivery is None:
        return WebhookOut(url=callback_url, state="waiting")
    get = delivery.get if isinstance(delivery, dict) else lambda k: getattr(delivery, k)
    state = get("state")
    return WebhookOut(url=callback_url, state=state, event=get("event"), attempts=get("attempts"),
                      last_status_code=get("last_status_code"), last_error=get("last_error"),
                      last_attempt_at=get("last_attempt_at"),
                      next_attempt_at=get("next_attempt_at") if state == "pending" else None,
                      delivered_at=get("delivered_at"))
