"""An amqtt topic plugin of the operator's own, loaded beside iotauth's to show that verdicts are AND-ed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from amqtt.plugins.base import BaseTopicPlugin


class DenyBlockedTopics(BaseTopicPlugin):
    """Refuses any topic with a ``blocked`` level, whatever iotauth's policy says."""

    @dataclass
    class Config:
        pass

    async def topic_filtering(self, *, session: Any = None, topic: str | None = None, action: Any = None) -> bool:
        return topic is not None and "blocked" not in topic.split("/")
