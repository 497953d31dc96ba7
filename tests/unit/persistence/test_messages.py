"""Storing messages: authorisation, deduplication, seq assignment, ack order, crash recovery."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace
from typing import Any

import pytest
from chatlib.kafka import RetryBatch
from chatlib.schemas import Deliver, MessageStored, UserRegistered, UserUnregistered, dm_conversation
from kafka.errors import KafkaTimeoutError

from services.persistence.service import Persistence
from tests.unit.persistence.conftest import dm, gmsg, make_service, set_group

AB = dm_conversation("alice", "bob")


def frames_to(svc: Persistence, user: str, device: str | None = None, kind: str | None = None) -> list[dict[str, Any]]:
    out = []
    for topic, ev, _ in svc.publisher.sent:  # type: ignore[attr-defined]
        if isinstance(ev, Deliver) and topic.startswith("gateway."):
            if any(t.user_id == user and (device is None or t.device_id == device) for t in ev.targets):
                out += [f for f in ev.frames if kind is None or f["type"] == kind]
    return out


def stored(svc: Persistence) -> list[Any]:
    return [ev.message for ev in svc.publisher.of(MessageStored)]  # type: ignore[attr-defined]


# -- authorisation -----------------------------------------------------------------


def test_dm_to_a_known_user_is_stored_announced_and_acked(svc: Persistence) -> None:
    svc.on_inbound([dm(cid="x1", body="hello")])
    [m] = stored(svc)
    assert (m.conversation, m.seq, m.sender, m.to, m.body, m.id) == (AB, 1, "alice", "bob", "hello", "x1")
    [ack] = frames_to(svc, "alice", "alice-phone", "ack")
    assert ack == {"type": "ack", "id": "x1", "message_id": m.message_id, "conversation": AB, "seq": 1, "ts": m.ts}
    topics = [t for t, ev, _ in svc.publisher.sent if isinstance(ev, Deliver)]  # type: ignore[attr-defined]
    assert topics == ["gateway.gw1.v1"]  # the sender's gateway


def test_unknown_recipient_is_refused_with_an_error_frame(svc: Persistence) -> None:
    svc.on_inbound([dm(to="nobody", cid="x1")])
    assert stored(svc) == []
    [err] = frames_to(svc, "alice", kind="error")
    assert (err["code"], err["ref"]) == ("not_found", "x1")
    assert svc.store.messages == {}  # type: ignore[attr-defined]


def test_deleted_recipient_is_refused(svc: Persistence) -> None:
    svc.on_user_events([UserUnregistered(user_id="bob")])
    svc.on_inbound([dm(cid="x1")])
    assert stored(svc) == []
    assert frames_to(svc, "alice", kind="error")[0]["code"] == "not_found"


def test_message_to_self_is_invalid(svc: Persistence) -> None:
    svc.on_inbound([dm(sender="alice", to="alice")])
    assert frames_to(svc, "alice", kind="error")[0]["code"] == "invalid_request"
    assert stored(svc) == []


def test_recipient_registered_a_moment_ago_is_waited_for() -> None:
    svc = make_service(catchup_wait_ms=3000)
    late = threading.Timer(0.1, lambda: svc.on_user_events([UserRegistered(user_id="newbie", username="n", name="N")]))
    late.start()
    started = time.monotonic()
    svc.on_inbound([dm(to="newbie")])
    late.join()
    assert [m.to for m in stored(svc)] == ["newbie"]
    assert time.monotonic() - started < 2.5  # woken by the projection, not by the deadline


def test_recipient_waits_past_the_deadline_while_the_users_consumer_rejoins() -> None:
    # After a restart the users consumer's group re-joins (the dead member holds it until
    # its session expires): a user who signed up just before is not in the projection yet.
    svc = make_service(catchup_wait_ms=100)
    users = SimpleNamespace(current=False)
    svc.consumer_of = lambda handler: users if handler == svc.on_user_events else None  # type: ignore[method-assign]

    def rejoined() -> None:
        svc.on_user_events([UserRegistered(user_id="newbie", username="n", name="N")])
        users.current = True

    late = threading.Timer(0.6, rejoined)  # well past catchup_wait_ms
    late.start()
    svc.on_inbound([dm(to="newbie")])
    late.join()
    assert [m.to for m in stored(svc)] == ["newbie"]
    assert frames_to(svc, "alice", kind="error") == []


def test_unknown_recipient_is_refused_without_the_long_wait_once_the_users_consumer_is_current() -> None:
    svc = make_service(catchup_wait_ms=100, catchup_rejoin_wait_ms=5000)
    svc.consumer_of = lambda handler: SimpleNamespace(current=True)  # type: ignore[method-assign]
    started = time.monotonic()
    svc.on_inbound([dm(to="nobody")])
    assert time.monotonic() - started < 1.0
    assert frames_to(svc, "alice", kind="error")[0]["code"] == "not_found"


def test_unknown_recipient_is_refused_when_the_users_consumer_stays_behind() -> None:
    svc = make_service(catchup_wait_ms=50, catchup_rejoin_wait_ms=300)
    svc.consumer_of = lambda handler: SimpleNamespace(current=False)  # type: ignore[method-assign]
    started = time.monotonic()
    svc.on_inbound([dm(to="nobody")])
    assert 0.3 <= time.monotonic() - started < 2.0
    assert frames_to(svc, "alice", kind="error")[0]["code"] == "not_found"


def test_group_member_may_post_and_stranger_may_not(svc: Persistence) -> None:
    set_group(svc, ["alice", "bob"])
    svc.on_inbound([gmsg("alice", cid="a1"), gmsg("carol", cid="c1"), gmsg("alice", group="nope", cid="a2")])
    assert [(m.sender, m.group, m.seq) for m in stored(svc)] == [("alice", "g1", 1)]
    codes = {f["ref"]: f["code"] for f in frames_to(svc, "carol", kind="error") + frames_to(svc, "alice", kind="error")}
    assert codes == {"c1": "forbidden", "a2": "not_found"}


def test_removed_member_can_no_longer_post(svc: Persistence) -> None:
    set_group(svc, ["alice", "bob"], ts=100)
    set_group(svc, ["alice"], ts=200)
    svc.on_inbound([gmsg("bob", cid="b1")])
    assert stored(svc) == []
    assert frames_to(svc, "bob", kind="error")[0]["code"] == "forbidden"


def test_deleted_group_refuses_messages(svc: Persistence) -> None:
    set_group(svc, ["alice", "bob"], ts=100)
    set_group(svc, ["alice", "bob"], ts=200, deleted=True)
    svc.on_inbound([gmsg("alice")])
    assert frames_to(svc, "alice", kind="error")[0]["code"] == "not_found"


# -- deduplication ------------------------------------------------------------------------


def test_retry_with_the_same_id_is_acked_again_not_stored_or_routed_again(svc: Persistence) -> None:
    svc.on_inbound([dm(cid="x1")])
    svc.on_inbound([dm(cid="x1", body="changed on retry")])
    [m] = stored(svc)
    acks = frames_to(svc, "alice", kind="ack")
    assert len(acks) == 2
    assert {(a["message_id"], a["seq"]) for a in acks} == {(m.message_id, 1)}
    assert len(svc.store.messages) == 1  # type: ignore[attr-defined]


def test_retry_inside_one_poll_is_stored_once(svc: Persistence) -> None:
    svc.on_inbound([dm(cid="x1"), dm(cid="x1")])
    assert len(stored(svc)) == 1
    assert len(frames_to(svc, "alice", kind="ack")) == 1


def test_retry_from_another_device_gets_its_ack_there(svc: Persistence) -> None:
    svc.on_inbound([dm(cid="x1", device="phone", gateway="gw1")])
    svc.on_inbound([dm(cid="x1", device="laptop", gateway="gw2")])
    assert len(frames_to(svc, "alice", "laptop", "ack")) == 1
    assert len(stored(svc)) == 1


def test_same_client_id_from_two_senders_are_two_messages(svc: Persistence) -> None:
    svc.on_inbound([dm(sender="alice", to="bob", cid="same"), dm(sender="bob", to="alice", cid="same")])
    assert [(m.sender, m.seq) for m in stored(svc)] == [("alice", 1), ("bob", 2)]


# -- seq assignment ----------------------------------------------------------------------------


def test_seqs_are_dense_per_conversation_in_batch_order_numbered_in_memory(svc: Persistence) -> None:
    batch = [
        dm(cid="1"),
        dm(to="carol", cid="2"),
        dm(cid="3"),
        dm(sender="bob", to="alice", cid="4"),
        dm(to="carol", cid="5"),
    ]
    svc.on_inbound(batch)
    got = [(m.id, m.conversation, m.seq) for m in stored(svc)]
    ac = dm_conversation("alice", "carol")
    assert sorted(got) == [("1", AB, 1), ("2", ac, 1), ("3", AB, 2), ("4", AB, 3), ("5", ac, 2)]
    # one load of both conversations' last seqs, one insert, one journaled conversations write
    assert svc.store.calls == [  # type: ignore[attr-defined]
        "load_lasts",
        "insert_new",
        "save_conversations",
    ]
    svc.on_inbound([dm(cid="6")])
    assert stored(svc)[-1].seq == 4
    assert svc.store.calls.count("load_lasts") == 1  # type: ignore[attr-defined]  # known from now on


def test_message_ids_are_opaque_and_unique(svc: Persistence) -> None:
    svc.on_inbound([dm(cid=str(i)) for i in range(20)])
    ids = [m.message_id for m in stored(svc)]
    assert len(set(ids)) == 20 and all(len(i) == 32 for i in ids)


def test_crash_between_reserving_and_writing_leaves_no_gap() -> None:
    svc = make_service()
    svc.on_inbound([dm(cid="1")])
    svc.store.fail_at = "insert_new"  # type: ignore[attr-defined]
    try:
        svc.on_inbound([dm(cid="2"), dm(cid="3")])
    except RuntimeError:
        pass
    # A new process after the crash (nothing verified yet), Kafka hands the same poll again.
    again = Persistence(svc.config, store=svc.store, publisher=svc.publisher, groups=svc.groups)
    again.on_inbound([dm(cid="2"), dm(cid="3")])
    assert [m.seq for m in stored(svc)] == [1, 2, 3]
    # and the same process retrying a failed poll does not leave a gap either
    again.store.fail_at = "insert_new"  # type: ignore[attr-defined]
    try:
        again.on_inbound([dm(cid="4")])
    except RuntimeError:
        pass
    again.on_inbound([dm(cid="4")])
    assert [m.seq for m in stored(svc)] == [1, 2, 3, 4]


def test_crash_after_writing_before_announcing_is_announced_on_redelivery() -> None:
    svc = make_service()
    svc.store.fail_at = "save_conversations"  # type: ignore[attr-defined]
    try:
        svc.on_inbound([dm(cid="1"), dm(cid="2")])
    except RuntimeError:
        pass
    assert stored(svc) == [] and frames_to(svc, "alice", kind="ack") == []
    again = Persistence(svc.config, store=svc.store, publisher=svc.publisher, groups=svc.groups)
    again.on_inbound([dm(cid="1"), dm(cid="2")])
    assert [m.seq for m in stored(svc)] == [1, 2]
    assert [a["seq"] for a in frames_to(svc, "alice", kind="ack")] == [1, 2]
    # once the conversation is verified, a client's retry is only acked
    again.on_inbound([dm(cid="1")])
    assert len(stored(svc)) == 2


def test_message_stored_is_produced_before_any_ack_and_flushed_before_the_commit(svc: Persistence) -> None:
    order: list[str] = []
    pub = svc.publisher
    real_send, real_flush = pub.send, pub.flush

    def send(topic: Any, ev: Any, key: str | None = None) -> None:
        order.append(type(ev).__name__)
        real_send(topic, ev, key)

    def flush(timeout: float = 10.0) -> None:
        order.append("flush")
        real_flush(timeout)

    pub.send, pub.flush = send, flush  # type: ignore[method-assign]
    svc.on_inbound([dm(cid="1"), dm(cid="2")])
    assert order == ["MessageStored", "MessageStored", "Deliver", "flush"]


def test_a_failed_flush_announces_the_messages_again_when_the_poll_is_retried(svc: Persistence) -> None:
    pub = svc.publisher
    real_flush = pub.flush

    def broken_flush(timeout: float = 10.0) -> None:
        raise KafkaTimeoutError("broker away")

    pub.flush = broken_flush  # type: ignore[method-assign]
    with pytest.raises(KafkaTimeoutError):
        svc.on_inbound([dm(cid="1"), dm(cid="2")])
    pub.flush = real_flush  # type: ignore[method-assign]
    pub.clear()  # type: ignore[attr-defined]
    svc.on_inbound([dm(cid="1"), dm(cid="2")])  # the consumer retries the same poll
    assert [m.seq for m in stored(svc)] == [1, 2]  # announced again, not numbered again
    assert [a["seq"] for a in frames_to(svc, "alice", kind="ack")] == [1, 2]
    assert len(svc.store.messages) == 2  # type: ignore[attr-defined]


def test_acks_to_one_device_are_one_record_in_seq_order(svc: Persistence) -> None:
    svc.on_inbound([dm(cid=str(i)) for i in range(5)])
    delivers = svc.publisher.of(Deliver)  # type: ignore[attr-defined]
    assert len(delivers) == 1
    assert [f["seq"] for f in delivers[0].frames] == [1, 2, 3, 4, 5]


def test_users_projection_is_cached_and_the_cache_follows_unregistration(svc: Persistence) -> None:
    calls: list[set[str]] = []
    real = svc.store.get_users

    def counting(ids: Any) -> Any:
        calls.append(set(ids))
        return real(ids)

    svc.store.get_users = counting  # type: ignore[method-assign]
    svc.on_inbound([dm(cid="1")])
    svc.on_inbound([dm(cid="2")])
    assert calls == [{"bob"}]  # the second poll needs no lookup
    svc.on_user_events([UserUnregistered(user_id="bob")])
    svc.on_inbound([dm(cid="3")])
    assert [m.id for m in stored(svc)] == ["1", "2"]
    assert frames_to(svc, "alice", kind="error")[0]["ref"] == "3"


def test_messages_numbered_elsewhere_make_the_batch_start_over_from_the_database() -> None:
    svc = make_service()
    svc.on_inbound([dm(cid="1")])
    # Another persistence process owned the conversation for a while (a rebalance) and stored seq 2.
    other = Persistence(svc.config, store=svc.store, publisher=svc.publisher, groups=svc.groups)
    other.on_inbound([dm(cid="2")])
    with pytest.raises(RetryBatch):
        svc.on_inbound([dm(cid="3")])  # seq 2 again: the unique index refuses it
    svc.on_inbound([dm(cid="3")])  # the consumer retries the same poll
    assert [(m.id, m.seq) for m in stored(svc)] == [("1", 1), ("2", 2), ("3", 3)]


def test_a_crash_between_the_insert_and_the_journaled_write_is_repaired_before_numbering() -> None:
    svc = make_service()
    svc.on_inbound([dm(cid="1")])
    svc.store.fail_at = "save_conversations"  # type: ignore[attr-defined]
    with pytest.raises(RuntimeError):
        svc.on_inbound([dm(cid="2"), dm(cid="3")])
    assert svc.store.conversations[AB]["last_seq"] == 1  # type: ignore[attr-defined]  # behind its messages
    again = Persistence(svc.config, store=svc.store, publisher=svc.publisher, groups=svc.groups)
    again.on_inbound([dm(cid="4")])  # another client's message first: numbered after the repaired last
    assert svc.store.conversations[AB]["last_seq"] == 4  # type: ignore[attr-defined]
    assert [m.seq for m in stored(svc) if m.id == "4"] == [4]


def test_a_rebalance_forgets_the_last_seqs_this_process_knew(svc: Persistence) -> None:
    svc.on_inbound([dm(cid="1")])
    svc.forget_owned_state()
    svc.on_inbound([dm(cid="2")])
    assert svc.store.calls.count("load_lasts") == 2  # type: ignore[attr-defined]
    assert [m.seq for m in stored(svc)] == [1, 2]


def test_a_retry_in_the_middle_of_a_batch_is_acked_with_its_stored_copy_and_the_rest_stay_dense(
    svc: Persistence,
) -> None:
    svc.on_inbound([dm(cid="old")])
    svc.publisher.clear()  # type: ignore[attr-defined]
    svc.on_inbound([dm(cid="new1"), dm(cid="old", body="again"), dm(cid="new2")])
    assert [(m.id, m.seq) for m in stored(svc)] == [("new1", 2), ("new2", 3)]
    acks = {a["id"]: a["seq"] for a in frames_to(svc, "alice", kind="ack")}
    assert acks == {"new1": 2, "old": 1, "new2": 3}
    assert len(svc.store.messages) == 3  # type: ignore[attr-defined]


def test_a_retry_refused_now_is_still_acked_when_it_was_stored_before(svc: Persistence) -> None:
    set_group(svc, ["alice", "bob"], ts=100)
    svc.on_inbound([gmsg("bob", cid="b1")])
    set_group(svc, ["alice"], ts=200)  # bob left before his retry came
    svc.publisher.clear()  # type: ignore[attr-defined]
    svc.on_inbound([gmsg("bob", cid="b1")])
    assert frames_to(svc, "bob", kind="error") == []
    assert [a["seq"] for a in frames_to(svc, "bob", kind="ack")] == [1]
