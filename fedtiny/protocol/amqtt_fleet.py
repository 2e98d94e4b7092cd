"""The embedded amqtt broker made to enforce what mosquitto enforces for a provisioned fleet.

FleetAccessPlugin (amqtt's plugin API): every client authenticates with the fleet's mosquitto password file,
and every publish, subscribe, delivery and last will obeys the fleet's ACL (fedtiny.protocol.acl).
FleetBroker: amqtt 0.11.4's Broker with the flaws fixed that no plugin can reach (each explained where it is).
Used by brokers.EmbeddedBroker; this module imports amqtt, brokers.py does not.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from amqtt.broker import Broker
from amqtt.contexts import Action
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin

from fedtiny.protocol import acl, keys

log = logging.getLogger("fedtiny.brokers")


class FleetAccessPlugin(BaseAuthPlugin, BaseTopicPlugin):
    """Authentication and topic ACL for one fleet. amqtt calls `authenticate` for each CONNECT and
    `topic_filtering` for each PUBLISH (write), SUBSCRIBE filter and delivery (read)."""

    @dataclass
    class Config:
        password_file: str  # broker/passwd from keys.provision_fleet (mosquitto's $7$ format)
        fleet: str

    def __init__(self, context) -> None:
        super().__init__(context)
        self._passwords = keys.read_mosquitto_passwords(self.config.password_file)
        # client id -> the username it authenticated as. The ACL asks this, never session.username: amqtt 0.11
        # copies the username of a new CONNECT into an existing session with the same client id *before*
        # authenticating it, so a failed login could otherwise lend its claimed name to a live session.
        self._owners: dict[str, str] = {}

    async def authenticate(self, *, session) -> bool:
        username, client_id = session.username, session.client_id
        password_hash = self._passwords.get(username) if username else None
        if password_hash is None or session.password is None or not keys.check_mosquitto_password(
            password_hash, session.password
        ):
            return _refused(session, "bad username or password")
        if self.context.get_session(client_id) is not None and self._owners.get(client_id, username) != username:
            # Neither resume nor take over another identity's session (its subscriptions and queued messages).
            return _refused(session, f"client id {client_id!r} has a session of another identity")
        if session.will_flag and not acl.allows(self.config.fleet, username, "write", session.will_topic or ""):
            # amqtt publishes a last will without asking the ACL; mosquitto refuses such a CONNECT too.
            return _refused(session, f"last will on {session.will_topic!r} is not its to write")
        self._owners[client_id] = username
        return True

    async def topic_filtering(self, *, session=None, topic=None, action=None) -> bool:
        username = self._owners.get(session.client_id) if session is not None else None
        if username is None or not topic:
            return False
        access = "write" if action == Action.PUBLISH else "read"
        allowed = acl.allows(self.config.fleet, username, access, topic)
        if not allowed and action != Action.RECEIVE:  # MQTT 3.1.1 cannot tell a publisher; the log does
            log.warning("refused %s on %s by %s (client id %r)", action, topic, username, session.client_id)
        return allowed


def _refused(session, reason: str) -> bool:
    log.warning("refused connection from %s:%s (client id %r, username %r): %s", session.remote_address,
                session.remote_port, session.client_id, session.username, reason)
    return False


class _Subscriptions(dict):
    """amqtt's table of subscriptions (topic filter -> [(session, qos)]), iterated over copies.

    amqtt 0.11 awaits inside `for topic_filter in self._subscriptions` (sending retained messages to each
    connecting client) and inside `for topic_filter, subscribers in self._subscriptions.items()` and the loop
    over `subscribers` within it (each broadcast, asking the topic plugin about each subscriber). When another
    client subscribes to a new filter meanwhile, Python raises "dictionary changed size during iteration": the
    connecting client got its CONNACK but its messages are never handled (issue #17, "Unhandled exception in
    client_connected_cb"), or a broadcast stops halfway. When a session is removed meanwhile, its entry leaves
    the list being walked and the next subscriber is skipped: it silently misses that message.
    """

    def __iter__(self):
        return iter(list(dict.keys(self)))

    def items(self):
        return [(topic_filter, list(subscribers)) for topic_filter, subscribers in dict.items(self)]


# The fields of a session that amqtt 0.11 overwrites from a new CONNECT with the same client id before it
# authenticates that CONNECT.
_CONNECT_FIELDS = ("username", "password", "will_flag", "will_topic", "will_message", "will_qos", "keep_alive")


class FleetBroker(Broker):
    """amqtt's Broker for a fleet: loads FleetAccessPlugin and fixes what it cannot (amqtt 0.11.4):

    - concurrent connects and subscribes no longer break its loops over the subscriptions (_Subscriptions);
    - retained messages go out only on SUBSCRIBE: amqtt also sent each connecting client those matching any
      client's filter (the coordinator's `status/+` brought every device the other devices' STATUS);
    - a CONNECT that fails authentication changes no existing session: amqtt deleted the old session of a
      clean-session client id, or copied will and credentials into a persistent one, before authenticating;
    - a persistent session taken over by a new connection (a device reconnecting before the broker saw its
      old connection close) stays connected: amqtt let the old connection's end mark it disconnected, and
      then queued every later message for it instead of sending it.
    """

    def __init__(self, config: dict, fleet: str, password_file: str) -> None:
        config = dict(config, plugins={  # and any plugins the config names (a simulation's payload capture)
            **config.get("plugins", {}),
            f"{__name__}.FleetAccessPlugin": {"password_file": str(password_file), "fleet": fleet},
        })
        super().__init__(config)
        self._subscriptions = _Subscriptions()
        self._authenticated: dict[str, dict] = {}  # client id -> its session's connect fields when it last logged in
        self._connecting: set[str] = set()  # client ids between their CONNACK and their message loop

    async def _publish_retained_messages_for_subscription(self, subscription, session) -> None:
        # Retained messages go out when a SUBSCRIBE is granted (by the ACL), as MQTT 3.1.1 says and mosquitto
        # does. amqtt also calls this on every connect, once for each filter of *any* client: skip those calls.
        if session.client_id not in self._connecting:
            await super()._publish_retained_messages_for_subscription(subscription, session)

    async def _delete_session(self, client_id: str) -> None:
        # amqtt calls this for a clean-session CONNECT before authenticating it; _authenticate does it after.
        pass

    async def _authenticate(self, session, listener) -> bool:
        client_id = session.client_id
        self._connecting.discard(client_id)  # left over only if a connect of this id failed halfway
        if not await super()._authenticate(session, listener):
            if session.parent == 1 and client_id in self._authenticated:  # undo amqtt's early overwrite
                for name, value in self._authenticated[client_id].items():
                    setattr(session, name, value)
            return False
        old, _ = self._sessions.get(client_id, (None, None))
        if session.clean_session and old is not None and old is not session:
            await self._cleanup_session(client_id)  # the deferred delete; also ends the old connection
        self._authenticated[client_id] = {name: getattr(session, name) for name in _CONNECT_FIELDS}
        return True

    async def _handle_disconnect(self, client_session, handler, disconnect_waiter) -> None:
        await super()._handle_disconnect(client_session, handler, disconnect_waiter)
        session_now, handler_now = self._sessions.get(client_session.client_id, (None, None))
        if session_now is client_session and handler_now not in (None, handler):  # taken over meanwhile
            client_session.transitions.connect()

    async def _publish_session_retained_messages(self, session) -> None:
        # amqtt calls this on every accepted connect, right after starting the new connection's handler and
        # before its loop over all subscriptions; _client_message_loop follows.
        self._connecting.add(session.client_id)
        # When the old connection's end was handled during a takeover, before the new handler was registered
        # (so _handle_disconnect could not tell), the session is marked disconnected here: it is not.
        if session.transitions.state != "connected":
            session.transitions.connect()
        await super()._publish_session_retained_messages(session)  # messages queued while it was away

    async def _client_message_loop(self, client_session, handler) -> None:
        self._connecting.discard(client_session.client_id)
        await super()._client_message_loop(client_session, handler)

    async def _cleanup_session(self, client_id: str) -> None:
        self._authenticated.pop(client_id, None)
        await super()._cleanup_session(client_id)
