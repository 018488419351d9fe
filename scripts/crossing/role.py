"""One role of the crossing microbenchmark (run by run.py on two simulated hosts): 100 MB
messages from host 0 to host 1, ten times, over plain TCP into one reused buffer (tcp), into a
fresh buffer per message (tcpfresh), or over ZMQ PUB/SUB (zmq); prints each round trip in ms."""
import sys, time, socket, struct, zmq, numpy as np
role, mode = sys.argv[1], sys.argv[2]
N = 100 * 2**20
if role == "rx":
    if mode.startswith("tcp"):
        srv = socket.create_server(("10.77.0.2", 29801)); c,_ = srv.accept(); buf = bytearray(N)
        for i in range(10):
            if mode == "tcpfresh":
                buf = bytearray(N)
            v = memoryview(buf)
            while v: v = v[c.recv_into(v):]
            c.sendall(b"k")
    else:
        ctx = zmq.Context(); s = ctx.socket(zmq.SUB); s.setsockopt(zmq.SUBSCRIBE, b""); s.setsockopt(zmq.RCVHWM,0)
        if mode == "zmqbuf": s.setsockopt(zmq.RCVBUF, 8<<20)
        s.connect("tcp://10.77.0.1:29802"); back = ctx.socket(zmq.PUSH); back.connect("tcp://10.77.0.1:29803")
        for i in range(11):
            m = s.recv(copy=False); back.send(b"k")
else:
    data = [np.random.bytes(N) for _ in range(2)]
    times = []
    if mode.startswith("tcp"):
        time.sleep(1); c = socket.create_connection(("10.77.0.2", 29801))
        for i in range(10):
            t = time.monotonic(); c.sendall(data[i%2]); c.recv(1); times.append(time.monotonic()-t)
    else:
        ctx = zmq.Context(); p = ctx.socket(zmq.XPUB); p.setsockopt(zmq.SNDHWM,0)
        if mode == "zmqbuf": p.setsockopt(zmq.SNDBUF, 8<<20)
        p.bind("tcp://10.77.0.1:29802"); back = ctx.socket(zmq.PULL); back.bind("tcp://10.77.0.1:29803")
        p.recv()  # subscription
        time.sleep(0.5)
        for i in range(11):
            t = time.monotonic(); p.send(data[i%2], copy=False); back.recv(); times.append(time.monotonic()-t)
        times = times[1:]
    print(mode, [round(x*1000,1) for x in times], "median", round(sorted(times)[len(times)//2]*1000,1))
