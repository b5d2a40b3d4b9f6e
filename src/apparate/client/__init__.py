"""Client tools: programs that send traffic to a server and measure what comes back.

They talk to a server only over HTTP (or start one as a subprocess); the server never imports
this package, so the serving process carries none of the load generators' dependencies.

    loadgen     the open-loop HTTP load generator (aiohttp) and its report (`apparate loadgen`)
    httpload    a raw HTTP/1.1 client cheap enough to overload a server (`apparate bench overload`)
    launch      starting and stopping `apparate serve` subprocesses on free loopback ports
"""
