"""Expected non-passing outcomes of CPython's test_asyncio, run by run_test_asyncio.py.

Each rule is ``xfail(pattern, reason, loops=..., py=...)`` (the test is run and expected to fail:
failed, error, hang or crash), ``flaky(...)`` (a failure is expected, a pass is fine) or
``exclude(...)`` (the test is not run: it hangs or burns a long timeout). Test ids are
``module.Class.test`` relative to ``test.test_asyncio``; patterns use fnmatch syntax; ``py`` is
"" (all), "3.12", "3.12+", "-3.11" or "3.10-3.11".

``loops=THIRD_PARTY`` (uvloop and tokioloop) is for tests that any loop other than asyncio's
must fail (e.g. they use asyncio's private implementation). At the time of writing there are
none: the uvloop rules below include tests of asyncio internals that uvloop fails, but the
tokioloop build measured (main at 061d6cb) passes them. Rules for uvloop record uvloop's own
behaviour and tell which failures are "any non-stdlib loop" issues; tokioloop rules are for
its maintainers to add with reasons; ``--check`` warns about xfails that pass (and, with
``--run-excluded``, about excluded tests that pass).

The stdlib loop (``--loop asyncio``) passes everything on 3.10-3.13 in this sandbox; there are no
environment rules.
"""

from __future__ import annotations

from _harness import Rule, exclude, flaky, xfail

UV = "uvloop"

RULES: list[Rule] = [
    # ------------------------------------------------------------------------------------------
    # uvloop: tests that use asyncio's private implementation (tokioloop passes these: it
    # provides the same private names/paths)
    # ------------------------------------------------------------------------------------------
    xfail(
        "test_events.EventLoopTests.test_timeout_rounding",
        "wraps the private BaseEventLoop._run_once",
        loops=UV,
    ),
    xfail(
        "test_events.EventLoopTests.test_prompt_cancellation",
        "calls the private BaseSelectorEventLoop._stop_serving",
        loops=UV,
    ),
    xfail(
        "test_server.TestServer2.test_wait_closed_*",
        "calls the private asyncio.base_events.Server._attach",
        loops=UV,
        py="3.12",
    ),
    xfail(
        "test_server.TestServer2.test_wait_closed_basic",
        "calls the private asyncio.base_events.Server._attach",
        loops=UV,
        py="3.13+",
    ),
    exclude(
        "test_ssl.TestSSL.test_flush_before_shutdown",
        "uses the private transport._ssl_protocol; after the AttributeError the test's server "
        "thread never finishes (hang)",
        loops=UV,
    ),
    xfail(
        "test_subprocess.SubprocessTests.test_popen_error*",
        "mocks subprocess.Popen, which only asyncio's own subprocess transport calls",
        loops=UV,
    ),
    xfail(
        "test_subprocess.SubprocessTests.test_pause_reading",
        "replaces loop.connect_read_pipe to spy on the pipe transport; asyncio's subprocess "
        "transport happens to create its pipes through that method",
        loops=UV,
    ),
    # ------------------------------------------------------------------------------------------
    # uvloop: core group
    # ------------------------------------------------------------------------------------------
    xfail(
        "test_events.TestPyGetEventLoop.test_get_event_loop_returns_running_loop*",
        "uvloop sets the running loop through the C _set_running_loop it bound at import; the "
        "test swaps in the pure-Python asyncio.events functions, which then see no running loop",
        loops=UV,
    ),
    exclude(
        "test_events.EventLoopTests.test_add_signal_handler",
        "uvloop does not dispatch a signal raised before the loop runs to the "
        "add_signal_handler callback; the test then waits 30 s and errors",
        loops=UV,
    ),
    xfail(
        "test_events.EventLoopTests.test_run_until_complete_nesting",
        "uvloop: no 'coroutine ... was never awaited' RuntimeWarning inside the with-block when "
        "the nested run_until_complete() is refused",
        loops=UV,
    ),
    xfail(
        "test_events.EventLoopTests.test_writer_callback",
        "uvloop: remove_writer() returns None instead of True for a registered writer",
        loops=UV,
    ),
    xfail(
        "test_tasks.RunCoroutineThreadsafeTests.test_run_coroutine_threadsafe_task_factory_exception",
        "uvloop always passes context= to the task factory; asyncio only when a context is given",
        loops=UV,
        py="3.11+",
    ),
    xfail(
        "test_base_events.BaseEventLoopTests.test_create_named_task_with_custom_factory",
        "uvloop always passes context= to the task factory; asyncio only when a context is given",
        loops=UV,
        py="3.11+",
    ),
    xfail(
        "test_futures2.*.test_task_exc_handler_correct_context",
        "uvloop: the loop's exception handler is not called for the dropped failed task by the "
        "time the test checks",
        loops=UV,
        py="3.12+",
    ),
    xfail(
        "test_eager_task_factory.*EagerTaskFactoryLoopTests.*",
        "uvloop passes eager_start= to the task factory; the factories of 3.13's "
        "create_eager_task_factory() do not accept it (TypeError)",
        loops=UV,
        py="3.13+",
    ),
    xfail(
        "test_eager_task_factory.Eager*Tests.*",
        "uvloop passes eager_start= to the task factory; the factories of 3.13's "
        "create_eager_task_factory() do not accept it (TypeError)",
        loops=UV,
        py="3.13+",
    ),
    xfail(
        "test_runners.RunTests.test_asyncio_run_debug",
        "uvloop does not take the debug default from asyncio.coroutines._is_debug_mode()",
        loops=UV,
    ),
    # ------------------------------------------------------------------------------------------
    # uvloop: network group
    # ------------------------------------------------------------------------------------------
    xfail(
        "test_events.EventLoopTests.test_create_*connection",
        "uvloop's transports are not asyncio.Transport instances",
        loops=UV,
    ),
    xfail(
        "test_events.EventLoopTests.test_create_datagram_endpoint*",
        "uvloop's transports are not asyncio.Transport instances",
        loops=UV,
    ),
    xfail(
        "test_sock_lowlevel.SockLowlevelTests.test_create_connection_sock",
        "uvloop's transports are not asyncio.Transport instances",
        loops=UV,
    ),
    xfail(
        "test_events.EventLoopTests.test_create_server_trsock",
        "uvloop's server sockets are uvloop.PseudoSocket, not asyncio.trsock.TransportSocket",
        loops=UV,
        py="3.12+",
    ),
    xfail(
        "test_events.EventLoopTests.test_create_connection_local_addr_in_use",
        "uvloop's EADDRINUSE error message does not name the address",
        loops=UV,
    ),
    xfail(
        "test_events.EventLoopTests.test_create_server_multiple_hosts_ipv*",
        "the test mocks socket.getaddrinfo to return unroutable addresses; uvloop resolves "
        "through libuv and really tries to bind them",
        loops=UV,
    ),
    exclude(
        "test_events.EventLoopTests.test_bidirectional_pty",
        "uvloop reads nothing from the pty master; the test waits 30 s and errors",
        loops=UV,
    ),
    xfail(
        "test_events.EventLoopTests.test_unclosed_pipe_transport",
        "uvloop's pipe transports report closed=True after loop.close() (asyncio: 'open')",
        loops=UV,
    ),
    flaky(
        "test_events.EventLoopTests.test_subprocess_shell",
        "uvloop sometimes completes the subprocess protocol (connection_lost) before every pipe "
        "has reported pipe_connection_lost (about 1 run in 3 on this VM)",
        loops=UV,
    ),
    xfail(
        "test_events.EventLoopTests.test_subprocess_shell_invalid_args",
        "uvloop raises TypeError (not ValueError) for a list passed to subprocess_shell()",
        loops=UV,
    ),
    xfail(
        "test_server.StartServerTests.test_start_*server_1",
        "uvloop: Server.sockets is a list, the test expects a tuple",
        loops=UV,
    ),
    xfail(
        "test_server.TestServer2.test_*_clients",
        "uvloop's Server has no close_clients()/abort_clients() (new in 3.13)",
        loops=UV,
        py="3.13+",
    ),
    xfail(
        "test_sock_lowlevel.SockLowlevelTests.test_recvfrom*",
        "uvloop does not implement sock_recvfrom()/sock_recvfrom_into() (NotImplementedError)",
        loops=UV,
        py="3.11+",
    ),
    xfail(
        "test_sock_lowlevel.SockLowlevelTests.test_sendto_blocking",
        "uvloop does not implement sock_sendto() (NotImplementedError)",
        loops=UV,
        py="3.11+",
    ),
    exclude(
        "test_sock_lowlevel.SockLowlevelTests.test_sock_client_racing",
        "hangs on uvloop: after one sleep(0) the test blocks in accept(), expecting "
        "sock_connect() to have called connect() already",
        loops=UV,
    ),
    xfail(
        "test_sendfile.SendfileTests.*",
        "uvloop does not implement loop.sendfile()/sock_sendfile() (NotImplementedError)",
        loops=UV,
    ),
    xfail(
        "test_subprocess.SubprocessTests.test_close_*",
        "uvloop: transport.get_extra_info('subprocess') is None (asyncio: the Popen object)",
        loops=UV,
    ),
    xfail(
        "test_subprocess.SubprocessTests.test_stdin_broken_pipe",
        "uvloop: writing to the stdin of a child that has exited raises RuntimeError (handler "
        "is closed) instead of BrokenPipeError/ConnectionResetError (3.10's version of the test)",
        loops=UV,
        py="3.10",
    ),
    xfail(
        "test_subprocess.SubprocessTests.test_devstdin_input",
        "uvloop: the child cannot open /dev/stdin on the stdin pipe uvloop gives it",
        loops=UV,
    ),
    exclude(
        "test_sslproto.StartTLSTests.test_start_tls_client_*_proto_1",
        "uvloop: the client side of start_tls() against the test's threaded TLS server never "
        "completes (30 s timeout or hang)",
        loops=UV,
    ),
    exclude(
        "test_sslproto.StartTLSTests.test_create_connection_memory_leak",
        "uvloop: create_connection(ssl=...) against the test's threaded TLS server never "
        "completes (30 s timeout or hang)",
        loops=UV,
    ),
    xfail(
        "test_ssl.TestSSL.test_remote_shutdown_receives_trailing_data",
        "uvloop: the peer sees the TLS connection aborted instead of the trailing data",
        loops=UV,
    ),
    xfail(
        "test_ssl.TestSSL.test_shutdown_timeout_handler_not_set",
        "uvloop: data received after resume_reading() during TLS shutdown is not delivered",
        loops=UV,
    ),
]
