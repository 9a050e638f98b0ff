"use strict";
// The streamgen page: one WebSocket to the server that served it. Text to video, or the camera restyled through
// video to video. Frames come as binary messages (u32 n | n bytes of JSON header | JPEG); only the newest is
// drawn, and each drawn frame is acknowledged so the server sends more: a slow page skips frames, it never lags.
(() => {
  const $ = (id) => document.getElementById(id);
  const el = {
    connection: $("connection"), prompt: $("prompt"), seed: $("seed"), fps: $("fps"), steps: $("steps"),
    mode: $("mode"), tokenRow: $("token-row"), token: $("token"), start: $("start"), stop: $("stop"),
    change: $("change"), message: $("message"), inputView: $("input-view"), camera: $("camera"),
    video: $("video"), caption: $("output-caption"), stats: $("stats"),
  };
  const ctx = el.video.getContext("2d");
  const grab = document.createElement("canvas");
  const now = () => performance.timeOrigin + performance.now();  // ms since the epoch, this page's clock
  const state = {
    ws: null, hello: null, stream: 0, running: false, starting: false, mode: "text", offsetMs: 0,
    shown: [], misses: 0, revision: null, dropped: 0, frames: 0, pending: null, drawing: false,
    camera: null, timer: null, inputBytes: 0,
  };

  function say(text, error = false) {
    el.message.textContent = text;
    el.message.className = error ? "error" : "";
  }

  function send(message) {
    if (state.ws && state.ws.readyState === WebSocket.OPEN) state.ws.send(JSON.stringify(message));
  }

  function buttons() {
    const open = state.ws && state.ws.readyState === WebSocket.OPEN && state.hello;
    el.start.disabled = !open || state.running || state.starting;
    el.stop.disabled = !open || !state.running;
    el.change.disabled = !open || !state.running;
  }

  function connect() {
    const ws = new WebSocket((location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/ws");
    ws.binaryType = "arraybuffer";
    state.ws = ws;
    ws.onmessage = (event) => (typeof event.data === "string" ? onMessage(JSON.parse(event.data))
                                                               : onFrame(event.data));
    ws.onclose = () => {
      el.connection.textContent = "disconnected";
      if (state.running || state.starting) say("The connection to the server closed: reload the page.", true);
      ended();
    };
  }

  function onMessage(m) {
    switch (m.type) {
      case "hello":
        state.hello = m;
        state.offsetMs = m.server_ms - now();
        el.connection.textContent = "connected";
        el.fps.max = String(m.max_fps);
        el.steps.max = String(m.max_steps);
        el.tokenRow.hidden = !m.auth;
        grab.width = m.width;
        grab.height = m.height;
        el.video.width = m.width;
        el.video.height = m.height;
        el.video.style.aspectRatio = el.camera.style.aspectRatio = `${m.width} / ${m.height}`;
        setInterval(() => send({ type: "ping", t: now() }), 5000);
        send({ type: "ping", t: now() });
        break;
      case "pong":  // NTP-style: the server's clock at the middle of the round trip
        state.offsetMs = m.server_ms - (m.t + now()) / 2;
        break;
      case "starting":
        Object.assign(state, { stream: m.stream, running: true, starting: false, mode: m.mode, shown: [],
                               misses: 0, revision: null, dropped: 0, frames: 0, pending: null });
        say("starting…");
        if (m.mode === "camera") startCapture();
        break;
      case "started":
        if (m.stream === state.stream) say(`streaming: stream ${m.stream_id}`);
        break;
      case "revision":
        say(`prompt changed: frames of revision ${m.revision} follow`);
        break;
      case "error":  // a refused message: a running stream goes on
        say(`Error: ${m.message}`, true);
        if (state.starting) { state.starting = false; stopCamera(); }
        break;
      case "ended":
        if (m.stream !== undefined && m.stream !== state.stream) break;
        if (m.code === "CANCELLED") say("stopped");
        else if (m.code === "OK") say("the stream ended");
        else if (m.code === "UNAUTHENTICATED") say(`Not started: ${m.message} (check the token).`, true);
        else say(`The server ended the stream (${m.code}): ${m.message}`, true);
        ended();
        break;
    }
    buttons();
  }

  function onFrame(buffer) {
    const n = new DataView(buffer).getUint32(0, true);
    const header = JSON.parse(new TextDecoder().decode(new Uint8Array(buffer, 4, n)));
    if (header.stream !== state.stream) return;
    state.pending = { header, jpeg: new Blob([new Uint8Array(buffer, 4 + n)], { type: "image/jpeg" }) };
    if (!state.drawing) draw();
  }

  async function draw() {  // the newest frame only; the ack covers every frame before it
    state.drawing = true;
    while (state.pending) {
      const { header, jpeg } = state.pending;
      state.pending = null;
      try {
        const bitmap = await createImageBitmap(jpeg);
        ctx.drawImage(bitmap, 0, 0, el.video.width, el.video.height);
        bitmap.close();
      } catch (err) {
        say(`a frame could not be decoded: ${err}`, true);
      }
      const t = now();
      const latency = state.mode === "camera" ? t - header.capture_ms : t - (header.due_ms - state.offsetMs);
      state.shown.push({ t, latency });
      state.frames += 1;
      state.misses += header.met ? 0 : 1;
      state.revision = header.revision;
      state.dropped = header.dropped;
      send({ type: "ack", stream: header.stream, seq: header.seq });
    }
    state.drawing = false;
  }

  function renderStats() {
    const t = now();
    state.shown = state.shown.filter((s) => s.t > t - 2000);
    const s = state.shown;
    const fps = s.length >= 2 ? (s.length - 1) / ((s[s.length - 1].t - s[0].t) / 1000) : 0;
    const latencies = s.map((x) => x.latency).sort((a, b) => a - b);
    const median = latencies.length ? Math.round(latencies[latencies.length >> 1]) : null;
    const latency = median === null ? "–" : `${Math.abs(median)} ms`;
    // a generated frame can be shown before its due time (the server's clock, estimated here): say so, unsigned
    const what = state.mode === "camera" ? "from capture" : median !== null && median < 0 ? "ahead of due" : "behind due";
    el.stats.textContent = `delivered ${fps.toFixed(1)} fps · latency ${latency} ${what} · deadline misses ` +
      `${state.misses} · revision ${state.revision ?? "–"} · dropped ${state.dropped}`;
    el.stats.dataset.frames = String(state.frames);
  }

  async function start() {
    if (state.hello.auth && !el.token.value.trim()) {
      say("This server needs a bearer token: enter yours in the Token box, then Start.", true);
      return;
    }
    const mode = el.mode.value;
    state.starting = true;
    buttons();
    if (mode === "camera") {
      try {
        state.camera = await navigator.mediaDevices.getUserMedia({ video: { width: 640, height: 480 }, audio: false });
      } catch (err) {
        state.starting = false;
        buttons();
        say(`No camera: ${err.message || err}`, true);
        return;
      }
      el.camera.srcObject = state.camera;
      el.inputView.hidden = false;
    }
    el.caption.textContent = mode === "camera" ? "Restyled (output)" : "Live output";
    send({ type: "start", mode, prompt: el.prompt.value, seed: Number(el.seed.value), fps: Number(el.fps.value),
           steps: Number(el.steps.value), token: el.token.value.trim() });
  }

  function startCapture() {  // the camera at the stream's fps, at the size the server generates
    const fps = Number(el.fps.value) || state.hello.fps;
    clearInterval(state.timer);
    state.timer = setInterval(capture, 1000 / fps);
  }

  function capture() {
    const v = el.camera;
    if (!state.running || v.readyState < 2 || !v.videoWidth) return;
    if (state.ws.bufferedAmount > 2 * state.inputBytes) return;  // the socket is backed up: skip (latest wins)
    const w = grab.width, h = grab.height;
    const scale = Math.max(w / v.videoWidth, h / v.videoHeight);  // centre crop to the output's aspect
    const cw = w / scale, ch = h / scale;
    const g = grab.getContext("2d");
    const captured = now();
    g.drawImage(v, (v.videoWidth - cw) / 2, (v.videoHeight - ch) / 2, cw, ch, 0, 0, w, h);
    const stream = state.stream;
    grab.toBlob(async (blob) => {
      if (!blob || stream !== state.stream || !state.running) return;
      const jpeg = new Uint8Array(await blob.arrayBuffer());
      const out = new Uint8Array(12 + jpeg.length);
      const dv = new DataView(out.buffer);
      dv.setFloat64(0, captured, true);
      dv.setUint16(8, w, true);
      dv.setUint16(10, h, true);
      out.set(jpeg, 12);
      state.inputBytes = out.length;
      if (state.ws.readyState === WebSocket.OPEN) state.ws.send(out.buffer);
    }, "image/jpeg", 0.85);
  }

  function stopCamera() {
    clearInterval(state.timer);
    state.timer = null;
    if (state.camera) state.camera.getTracks().forEach((track) => track.stop());
    state.camera = null;
  }

  function ended() {
    state.running = false;
    state.starting = false;
    stopCamera();
    buttons();
  }

  el.start.addEventListener("click", start);
  el.stop.addEventListener("click", () => send({ type: "stop" }));
  el.change.addEventListener("click", () => send({ type: "control", prompt: el.prompt.value }));
  el.token.addEventListener("input", () => { if (el.message.className === "error") say(""); });
  setInterval(renderStats, 250);
  // For scripts driving the page (its tests): send a raw message, read the state.
  window.streamgenPage = { sendRaw: (text) => state.ws.send(text), state };
  connect();
})();
