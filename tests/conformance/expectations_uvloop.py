"""Expected non-passing outcomes of uvloop's own tests, run by run_uvloop_tests.py.

Each rule is ``xfail(pattern, reason, loops=..., py=...)`` (run, expected to fail) or
``exclude(...)`` (not run: hangs or burns a long timeout). Test ids are ``module.Class.test``
as uvloop's ``tests/`` folder names them (``Test_UV_*`` classes run the chosen loop when
``--loop`` is not uvloop); patterns use fnmatch syntax; ``py`` is "" (all), "3.12", "3.12+",
"-3.11" or "3.10-3.11".

With ``--loop uvloop`` the suite passes as it does upstream (``--compare-upstream`` checks this
test by test). With ``--loop asyncio`` the failures below are the tests written for uvloop only
(defined on the UV class, with no AIO twin): they pin uvloop-specific behaviour or API.
``NOT_UVLOOP`` rules concern uvloop's private API, which no other loop has; the others record
where asyncio behaves differently, which tokioloop may or may not choose to match (its rules
are added once it runs; ``--check`` warns about xfails that pass).
"""

from __future__ import annotations

from _harness import Rule, exclude, xfail

NOT_UVLOOP = ("asyncio", "tokioloop")
AIO = "asyncio"

RULES: list[Rule] = [
    # ------------------------------------------------------------------------------------------
    # uvloop's own suite as uvloop runs it
    # ------------------------------------------------------------------------------------------
    xfail(
        "test_base.TestBaseAIO.test_loop_create_task_eager_start",
        "fails in uvloop's own suite on 3.13.0 as well (same error in --compare-upstream): "
        "the AIO twin calls loop.create_task(eager_start=...), which asyncio 3.13.0 lacks",
        loops="uvloop",
        py="3.13",
    ),
    # ------------------------------------------------------------------------------------------
    # uvloop's private API: fails on any other loop
    # ------------------------------------------------------------------------------------------
    xfail(
        "test_sockets.TestUVSockets.test_socket_sync_remove",
        "uses uvloop's private loop._get_backend_id() (its epoll fd)",
        loops=NOT_UVLOOP,
    ),
    xfail(
        "test_sockets.TestUVSockets.test_pseudosocket",
        "checks the repr of uvloop's PseudoSocket class",
        loops=NOT_UVLOOP,
    ),
    xfail(
        "test_process.Test_UV_Process_Delayed.test_process_delayed_stdio__paused__*",
        "passes uvloop's private __uvloop_sleep_after_fork argument to subprocess_exec()",
        loops=NOT_UVLOOP,
    ),
    # ------------------------------------------------------------------------------------------
    # uvloop-only behaviour that asyncio does not have
    # ------------------------------------------------------------------------------------------
    xfail(
        "test_signals.Test_UV_Signals.test_signals_no_SIGCHLD",
        "uvloop refuses add_signal_handler(SIGCHLD) (it reaps children itself); asyncio allows",
        loops=AIO,
    ),
    xfail(
        "test_runner.TestSourceCode.test_uvloop_run_2",
        "uvloop.run() raises TypeError for a loop_factory making another loop type; the "
        "asyncio stand-in for uvloop.run() (asyncio.run) does not check",
        loops=AIO,
    ),
    xfail(
        "test_tcp.Test_UV_TCP.test_create_server_buffered_*",
        "uvloop treats any protocol with get_buffer()/buffer_updated() as buffered; asyncio "
        "requires an asyncio.BufferedProtocol instance",
        loops=AIO,
    ),
    xfail(
        "test_unix.Test_UV_Unix.test_epollhup",
        "uvloop treats any protocol with get_buffer()/buffer_updated() as buffered; asyncio "
        "requires an asyncio.BufferedProtocol instance",
        loops=AIO,
    ),
    xfail(
        "test_tcp.Test_UV_TCP.test_tcp_handle_abort_in_connection_made",
        "uvloop: get_extra_info('socket') is None once the transport is aborted; asyncio "
        "still returns the (closed) TransportSocket",
        loops=AIO,
    ),
    xfail(
        "test_unix.Test_UV_Unix.test_create_unix_server_path_stream_bittype",
        "passes cleanup_socket= to create_unix_server(), which asyncio has only from 3.13",
        loops=AIO,
        py="-3.12",
    ),
    xfail(
        "test_udp.Test_UV_UDP.test_send_after_close",
        "asyncio's datagram transport errors (and its error path crashes) on sendto() after "
        "close(); uvloop ignores it",
        loops=AIO,
    ),
    xfail(
        "test_udp.Test_UV_UDP.test_udp_sendto_dns",
        "uvloop raises ValueError for sendto() to a host name; asyncio does not check",
        loops=AIO,
    ),
    xfail(
        "test_sockets.TestUVSockets.test_socket_close_loop_and_close",
        "uvloop forgets a socket whose pending sock_recv() was abandoned with the loop; "
        "asyncio still holds its fd registered",
        loops=AIO,
    ),
    xfail(
        "test_sockets.TestUVSockets.test_socket_recv*_and_close",
        "closing a socket with a pending sock_recv()/sock_recv_into(): uvloop fails the "
        "call, asyncio never completes it (the test times out)",
        loops=AIO,
    ),
    xfail(
        "test_base.TestBaseUV.test_loop_create_task_eager_start",
        "uvloop accepts loop.create_task(eager_start=...) on 3.13; asyncio only from 3.14",
        loops=AIO,
        py="3.13",
    ),
    xfail(
        "test_udp.Test_UV_UDP.test_create_datagram_endpoint_wrong_sock",
        "matches uvloop's error text 'A UDP Socket was expected'; asyncio 3.13 says 'A "
        "datagram socket was expected' (tokioloop uses the running Python's "
        "create_datagram_endpoint())",
        loops=NOT_UVLOOP,
        py="3.13+",
    ),
    # ------------------------------------------------------------------------------------------
    # uvloop-only behaviour that tokioloop does not copy (it keeps asyncio's)
    # ------------------------------------------------------------------------------------------
    xfail(
        "test_signals.Test_UV_Signals.test_signals_no_SIGCHLD",
        "uvloop refuses add_signal_handler(SIGCHLD) because it reaps children from that "
        "signal; tokioloop watches children through pidfds, so it allows it as asyncio does",
        loops="tokioloop",
    ),
    xfail(
        "test_runner.TestSourceCode.test_uvloop_run_2",
        "uvloop.run(loop_factory=...) and its check that the factory makes a uvloop loop; "
        "tokioloop.run() takes no loop_factory (asyncio.run(main, "
        "loop_factory=tokioloop.new_event_loop) is asyncio's way to pick the loop)",
        loops="tokioloop",
    ),
    xfail(
        "test_tcp.Test_UV_TCP.test_create_server_buffered_2",
        "uvloop wraps an exception from get_buffer() in RuntimeError('unhandled error ... "
        "get_buffer'); tokioloop hands asyncio's original exception to connection_lost()",
        loops="tokioloop",
    ),
    xfail(
        "test_tcp.Test_UV_TCP.test_tcp_handle_abort_in_connection_made",
        "uvloop: get_extra_info('socket') is None once the transport is aborted; tokioloop "
        "returns the (closed) TransportSocket, as asyncio does",
        loops="tokioloop",
    ),
    xfail(
        "test_udp.Test_UV_UDP.test_udp_sendto_dns",
        "uvloop raises ValueError for sendto() to a host name; tokioloop lets the socket "
        "module resolve it, as asyncio does",
        loops="tokioloop",
    ),
    xfail(
        "test_udp.Test_UV_UDP.test_create_datagram_endpoint_reuse_address_*",
        "asyncio removed create_datagram_endpoint(reuse_address=) in 3.11 (TypeError); "
        "tokioloop takes the running Python's asyncio signature",
        loops="tokioloop",
        py="3.11+",
    ),
    xfail(
        "test_tcp.Test_UV_TCPSSL.test_shutdown_timeout",
        "asyncio 3.10's create_server() has no ssl_shutdown_timeout= (added in 3.11; "
        "TypeError); tokioloop takes the running Python's asyncio signature",
        loops="tokioloop",
        py="3.10",
    ),
    xfail(
        "test_unix.Test_UV_Unix.test_epollhup",
        "before 3.12 asyncio's Server.wait_closed() returns at once after close(), so the "
        "loop stops before the server has read the client's last bytes, EOF and "
        "connection_lost(); uvloop gets them in its last iteration because libuv reads up "
        "to 32 times per wake-up and treats EPOLLHUP after a short read as EOF, where "
        "tokioloop reads once per iteration as asyncio",
        loops="tokioloop",
        py="3.10-3.11",
    ),
    xfail(
        "test_base.TestBaseUV.test_thread_name_prefix_in_default_executor",
        "uvloop names its default executor's threads 'uvloop...'; tokioloop keeps asyncio's "
        "'asyncio' prefix",
        loops="tokioloop",
    ),
    xfail(
        "test_tcp.Test_UV_TCPSSL.test_shutdown_timeout_handler_not_set",
        "a TCP EOF (no close_notify) while the application has paused reading: tokioloop keeps "
        "the TLS connection open so that the data already received is delivered on "
        "resume_reading() (asyncio 3.11+'s choice); uvloop drops that data and closes. The "
        "test's protocol resumes reading only in eof_received(), which neither loop calls, so "
        "it waits",
        loops="tokioloop",
    ),
    exclude(
        "test_sockets.TestUVSockets.test_socket_connect_and_close",
        "closing a socket with a pending sock_connect(): uvloop fails the call, asyncio "
        "never completes it (the test hangs)",
        loops=AIO,
    ),
]
