// The redpacket page: send, open and follow red packets through the public API.
//
// Rules this file keeps:
// - Money is integer cents. Amounts typed in yuan are parsed from the decimal string
//   ("8.88" -> 888), never through a float; shown amounts are formatted from cents.
// - Ids are strings (63-bit; a JS number would round them).
// - Text from other users goes into the page with textContent only, never as markup.
// - The token lives in sessionStorage (this tab only), never in a URL.
// - Features that arrived later in the API (packet kinds, "my red packets") are used only
//   when /openapi.json describes them, so the page works against older gateways too.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const TOKEN_KEY = "redpacket.token";
  const KINDS = ["lucky", "equal", "exclusive"];
  const KIND_NAMES = { lucky: "拼手气红包", equal: "普通红包", exclusive: "专属红包" };
  const REFRESH_MS = 2000;
  const MIN_SPIN_MS = 700; // the coin turns at least this long, so the open feels like one

  const state = {
    token: null,
    me: null, // {uid, name} from the token's claims
    features: null, // {kinds: [..] | null, me: bool}
    routeSeq: 0, // bumped on every route change; stale async work checks it and stops
    timer: null,
    kind: "lucky",
    pendingCreate: null, // {body, key}: a retried identical create reuses its Idempotency-Key
    meYear: null,
    meTab: "received",
    meCursor: null,
    walletCursor: null,
  };

  // -- money ---------------------------------------------------------------------------------

  /** "8.88" -> {cents: 888}; never a float on the way. */
  function parseYuan(text) {
    const s = text.trim();
    if (/^\d+\.\d{3,}$/.test(s)) return { error: "金额最多两位小数" };
    const m = /^(\d{1,7})(?:\.(\d{0,2}))?$/.exec(s);
    if (!m) return { error: "请输入金额，例如 8.88" };
    return { cents: Number(m[1]) * 100 + Number(`${m[2] || ""}00`.slice(0, 2)) };
  }

  function yuan(cents) {
    const c = Math.trunc(Number(cents));
    const sign = c < 0 ? "-" : "";
    const a = Math.abs(c);
    return `${sign}${Math.trunc(a / 100)}.${String(a % 100).padStart(2, "0")}`;
  }

  // -- small DOM helpers ---------------------------------------------------------------------

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function initial(name) {
    if (/^用户 \d+$/.test(name || "")) return "红"; // a sender the API gives no name for
    const first = Array.from((name || "").trim())[0];
    return first ? first.toUpperCase() : "?";
  }

  function avatar(name) {
    return el("span", "avatar", initial(name));
  }

  function pad2(n) {
    return String(n).padStart(2, "0");
  }

  function when(iso) {
    const d = new Date(iso);
    if (Number.isNaN(d.getTime())) return "";
    const time = `${pad2(d.getHours())}:${pad2(d.getMinutes())}:${pad2(d.getSeconds())}`;
    const today = new Date();
    if (d.toDateString() === today.toDateString()) return time;
    return `${d.getMonth() + 1}月${d.getDate()}日 ${time}`;
  }

  function sleep(ms) {
    return new Promise((resolve) => setTimeout(resolve, ms));
  }

  function banner(text) {
    $("banner").textContent = text || "";
    $("banner").hidden = !text;
  }

  function errorText(data, fallback) {
    const err = data && data.error;
    return err && err.message ? err.message : fallback;
  }

  // -- session ---------------------------------------------------------------------------------

  function claimsOf(token) {
    const part = token.split(".")[1];
    if (!part) return null;
    try {
      const b64 = part.replace(/-/g, "+").replace(/_/g, "/");
      const bytes = Uint8Array.from(atob(b64 + "===".slice((b64.length + 3) % 4)), (ch) =>
        ch.charCodeAt(0),
      );
      return JSON.parse(new TextDecoder().decode(bytes));
    } catch {
      return null;
    }
  }

  function useToken(token) {
    const claims = claimsOf(token);
    if (!claims || typeof claims.sub !== "string" || !/^\d{1,19}$/.test(claims.sub)) return false;
    if (typeof claims.exp === "number" && claims.exp * 1000 <= Date.now()) return false;
    state.token = token;
    state.me = { uid: claims.sub, name: typeof claims.name === "string" ? claims.name : "" };
    sessionStorage.setItem(TOKEN_KEY, token);
    return true;
  }

  function signOut(message) {
    state.token = null;
    state.me = null;
    sessionStorage.removeItem(TOKEN_KEY);
    banner(message || "");
    route();
  }

  class SignedOut extends Error {}

  /** One API call: {status, data}. 401 signs out; a network failure throws. */
  async function api(method, path, body, headers) {
    const init = { method, headers: { Accept: "application/json", ...(headers || {}) } };
    if (state.token) init.headers.Authorization = `Bearer ${state.token}`;
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    let response;
    try {
      response = await fetch(path, init);
    } catch {
      throw new Error("网络不通，请稍后再试");
    }
    let data = null;
    try {
      data = await response.json();
    } catch {
      data = null;
    }
    if (response.status === 401 && state.token) {
      signOut("登录已过期，请重新登录");
      throw new SignedOut();
    }
    return { status: response.status, data };
  }

  // -- what this gateway's API has -----------------------------------------------------------

  function deref(doc, node) {
    for (let i = 0; node && node.$ref && i < 10; i++) {
      if (!node.$ref.startsWith("#/")) return null;
      node = node.$ref
        .slice(2)
        .split("/")
        .reduce((at, key) => (at ? at[key.replace(/~1/g, "/").replace(/~0/g, "~")] : null), doc);
    }
    return node || null;
  }

  function findProperty(doc, schema, name, depth = 0) {
    schema = deref(doc, schema);
    if (!schema || depth > 6) return null;
    if (schema.properties && schema.properties[name]) return deref(doc, schema.properties[name]);
    for (const key of ["allOf", "oneOf", "anyOf"]) {
      for (const sub of schema[key] || []) {
        const found = findProperty(doc, sub, name, depth + 1);
        if (found) return found;
      }
    }
    return null;
  }

  async function loadFeatures() {
    if (state.features) return state.features;
    const features = { kinds: null, me: false, wallet: false };
    try {
      const response = await fetch("/openapi.json", { headers: { Accept: "application/json" } });
      const doc = await response.json();
      const paths = doc.paths || {};
      const create = paths["/v1/red-packets"] && paths["/v1/red-packets"].post;
      const body = create && deref(doc, create.requestBody);
      const schema = body && body.content && body.content["application/json"];
      const kind = schema && findProperty(doc, schema.schema, "kind");
      if (kind) {
        const listed = Array.isArray(kind.enum) ? kind.enum : KINDS;
        features.kinds = KINDS.filter((k) => listed.includes(k));
      }
      features.me = Boolean(paths["/v1/me/received"] && paths["/v1/me/sent"]);
      features.wallet = Boolean(paths["/v1/me/wallet"] && paths["/v1/me/wallet/transactions"]);
    } catch {
      // an API description we cannot read: offer what every version has
    }
    state.features = features;
    return features;
  }

  // -- routing -------------------------------------------------------------------------------

  const VIEWS = ["signin", "send", "packet", "me", "wallet"];

  function show(view) {
    for (const name of VIEWS) $(`view-${name}`).hidden = name !== view;
    $("nav").hidden = view === "signin";
    $("nav-send").classList.toggle("current", view === "send");
    $("nav-me").classList.toggle("current", view === "me");
    $("nav-wallet").classList.toggle("current", view === "wallet");
    document.body.dataset.view = view;
  }

  function route() {
    state.routeSeq += 1;
    clearTimeout(state.timer);
    if (!state.token) {
      show("signin");
      $("signin-uid").focus();
      return;
    }
    $("who").textContent = state.me.name || `用户 ${state.me.uid}`;
    $("who").title = `uid ${state.me.uid} · 点击退出登录`;
    $("nav-me").hidden = !(state.features && state.features.me);
    $("nav-wallet").hidden = !(state.features && state.features.wallet);
    refreshBalance();
    const hash = location.hash || "#/";
    const packet = /^#\/p\/([A-Za-z0-9_-]{1,22})$/.exec(hash);
    if (packet) {
      showPacket(packet[1], state.routeSeq);
    } else if (hash === "#/me") {
      showMe(state.routeSeq);
    } else if (hash === "#/wallet" && state.features && state.features.wallet) {
      showWallet(state.routeSeq);
    } else {
      showSend();
    }
  }

  // -- sign in -------------------------------------------------------------------------------

  async function signIn(event) {
    event.preventDefault();
    $("signin-error").textContent = "";
    const uid = $("signin-uid").value.trim();
    const name = $("signin-name").value.trim();
    if (!/^[1-9]\d{0,18}$/.test(uid)) {
      $("signin-error").textContent = "用户 ID 是一个正整数";
      return;
    }
    if (!name) {
      $("signin-error").textContent = "请填写昵称";
      return;
    }
    $("signin-button").disabled = true;
    try {
      const { status, data } = await api("POST", "/dev/login", { uid, name });
      if (status === 404) {
        $("signin-form").hidden = true;
        $("token-form").hidden = false;
        return;
      }
      if (status !== 200 || !data || !useToken(data.token)) {
        $("signin-error").textContent = errorText(data, `登录失败 (${status})`);
        return;
      }
      banner("");
      route();
    } catch (err) {
      $("signin-error").textContent = err.message;
    } finally {
      $("signin-button").disabled = false;
    }
  }

  function pasteToken(event) {
    event.preventDefault();
    if (useToken($("token-input").value.trim())) {
      $("token-input").value = "";
      banner("");
      route();
    } else {
      $("signin-error").textContent = "这不是一个有效的令牌（或已过期）";
    }
  }

  // -- send ----------------------------------------------------------------------------------

  function setKind(kind) {
    state.kind = kind;
    for (const button of $("kinds").querySelectorAll("button")) {
      button.setAttribute("aria-checked", String(button.dataset.kind === kind));
    }
    $("row-receiver").hidden = kind !== "exclusive";
    $("row-shares").hidden = kind === "exclusive";
    $("amount-label").textContent =
      kind === "equal" ? "单个金额" : kind === "exclusive" ? "金额" : "总金额";
    $("kind-hint").textContent =
      kind === "equal"
        ? "每人收到的金额相同"
        : kind === "exclusive"
          ? "只有你指定的人能领取"
          : "每人抽到的金额随机";
    updateTotal();
  }

  function sharesValue() {
    const text = $("send-shares").value.trim();
    return /^\d{1,4}$/.test(text) ? Number(text) : null;
  }

  function updateTotal() {
    const parsed = parseYuan($("send-amount").value || "0");
    let cents = parsed.cents || 0;
    if (state.kind === "equal") cents *= sharesValue() || 0;
    $("send-total-value").textContent = yuan(cents);
  }

  function newIdempotencyKey() {
    const bytes = crypto.getRandomValues(new Uint8Array(16));
    return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  function showSend() {
    show("send");
    document.title = "发红包 · redpacket";
    const kinds = state.features && state.features.kinds;
    $("kinds").hidden = !kinds;
    if (kinds) {
      for (const button of $("kinds").querySelectorAll("button")) {
        button.hidden = !kinds.includes(button.dataset.kind);
      }
    }
    setKind(kinds && kinds.includes(state.kind) ? state.kind : "lucky");
  }

  function createBody() {
    const amount = parseYuan($("send-amount").value);
    if (amount.error) return { error: amount.error, field: "send-amount" };
    if (amount.cents < 1) return { error: "金额至少 0.01 元", field: "send-amount" };
    const body = {};
    if (state.kind === "exclusive") {
      const receiver = $("send-receiver").value.trim();
      if (!/^[1-9]\d{0,18}$/.test(receiver)) {
        return { error: "请填写对方的用户 ID", field: "send-receiver" };
      }
      Object.assign(body, {
        kind: "exclusive",
        receiver_uid: receiver,
        total_amount: amount.cents,
        total_packet: 1,
      });
    } else {
      const shares = sharesValue();
      if (!shares || shares < 1) return { error: "请填写红包个数", field: "send-shares" };
      if (state.kind === "equal") {
        Object.assign(body, { kind: "equal", amount_each: amount.cents, total_packet: shares });
      } else {
        if (amount.cents < shares) {
          return { error: "每个红包至少 0.01 元", field: "send-amount" };
        }
        Object.assign(body, { total_amount: amount.cents, total_packet: shares });
      }
    }
    const greeting = $("send-greeting").value.trim();
    if (greeting) body.greeting = greeting;
    return { body };
  }

  async function send(event) {
    event.preventDefault();
    $("send-error").textContent = "";
    $("sent").hidden = true;
    const { body, error, field } = createBody();
    if (error) {
      $("send-error").textContent = error;
      $(field).focus();
      return;
    }
    const json = JSON.stringify(body);
    if (!state.pendingCreate || state.pendingCreate.body !== json) {
      state.pendingCreate = { body: json, key: newIdempotencyKey() };
    }
    $("send-button").disabled = true;
    try {
      const { status, data } = await api("POST", "/v1/red-packets", body, {
        "Idempotency-Key": state.pendingCreate.key,
      });
      if (status === 402 && data && data.error) {
        // not enough money: nothing was debited and no packet was made
        $("send-error").textContent = `余额不足：零钱只有${yuan(data.error.balance || 0)}元`;
        state.pendingCreate = null;
        refreshBalance();
        return;
      }
      if (status !== 201) {
        $("send-error").textContent = errorText(data, `没有发出去 (${status})，请重试`);
        if (status < 500 && status !== 429) state.pendingCreate = null;
        return;
      }
      state.pendingCreate = null;
      refreshBalance();
      const link = `${location.origin}/app/#/p/${data.red_packet_id}`;
      $("sent-link").textContent = link;
      $("sent-link").href = link;
      $("sent-open").href = `#/p/${data.red_packet_id}`;
      $("sent").hidden = false;
      $("sent").dataset.packetId = data.red_packet_id;
      $("sent").scrollIntoView({ block: "nearest" });
    } catch (err) {
      if (!(err instanceof SignedOut)) $("send-error").textContent = err.message;
    } finally {
      $("send-button").disabled = false;
    }
  }

  async function copy(text, button) {
    try {
      await navigator.clipboard.writeText(text);
    } catch {
      const area = el("textarea");
      area.value = text;
      document.body.append(area);
      area.select();
      document.execCommand("copy");
      area.remove();
    }
    const before = button.textContent;
    button.textContent = "已复制";
    setTimeout(() => {
      button.textContent = before;
    }, 1500);
  }

  // -- one red packet ------------------------------------------------------------------------

  const OUTCOMES = {
    sold_out: "手慢了，红包派完了",
    expired: "该红包已过期",
    refunded: "该红包已过期，未领取的金额已退回",
    not_for_you: "这是发给别人的专属红包",
    sent_sold_out: "红包已被领完",
    sent_expired: "红包已过期",
    sent_refunded: "红包已过期，未领取的金额已退回",
    not_found: "没有这个红包",
    invalid_id: "没有这个红包",
  };

  const view = { id: null, packet: null, records: [], mine: null, opening: false };

  function senderName(packet, records) {
    if (packet.sender && packet.sender.nick_name) return packet.sender.nick_name;
    if (typeof packet.nick_name === "string" && packet.nick_name) return packet.nick_name;
    if (state.me && packet.uid === state.me.uid) return state.me.name || "我";
    const own = records.find((r) => r.uid === packet.uid && r.nick_name);
    return own ? own.nick_name : `用户 ${packet.uid}`;
  }

  function setEnvelope(stateName) {
    $("envelope").dataset.state = stateName;
    $("open-button").disabled = stateName !== "closed";
  }

  function showOutcome(reason, amount, mine) {
    if (reason === "already_opened" && amount !== undefined && amount !== null) {
      showAmount(amount, "你已经领过这个红包");
      return;
    }
    $("amount-box").hidden = true;
    $("amount-note").hidden = true;
    $("outcome").hidden = false;
    $("outcome").dataset.reason = reason;
    $("outcome").textContent =
      (mine && OUTCOMES[`sent_${reason}`]) || OUTCOMES[reason] || "这个红包不能领取";
    setEnvelope("refused");
  }

  function showAmount(cents, note) {
    view.mine = cents;
    $("outcome").hidden = true;
    $("amount").textContent = yuan(cents);
    $("amount").dataset.cents = String(cents);
    $("amount-box").hidden = false;
    $("amount-note").textContent = note;
    $("amount-note").hidden = false;
    setEnvelope("opened");
  }

  function renderHeader(packet, records) {
    const name = senderName(packet, records);
    $("sender-avatar").textContent = initial(name);
    const exclusive =
      packet.kind === "exclusive" && packet.receiver_uid ? `发给用户 ${packet.receiver_uid} 的` : "的";
    $("sender-name").textContent = `${name}${exclusive}${packet.kind === "exclusive" ? "专属红包" : "红包"}`;
    $("greeting").textContent = packet.greeting || "";
    document.title = `${name}的红包 · redpacket`;
  }

  function finishedIn(packet, records) {
    if (packet.status !== "sold_out" || records.length !== packet.total_packet) return "";
    const last = Math.max(...records.map((r) => Date.parse(r.create_time)));
    const seconds = Math.max(1, Math.round((last - Date.parse(packet.create_time)) / 1000));
    if (seconds < 60) return `，${seconds}秒被抢光`;
    if (seconds < 3600) return `，${Math.round(seconds / 60)}分钟被抢光`;
    return `，${Math.round(seconds / 3600)}小时被抢光`;
  }

  function renderSummary(packet, records) {
    const opened = packet.total_packet - packet.remaining_packet;
    const openedAmount = packet.total_amount - packet.remaining_amount;
    let text;
    if (packet.status === "sold_out") {
      text = `${packet.total_packet}个红包共${yuan(packet.total_amount)}元${finishedIn(packet, records)}`;
    } else {
      text = `已领取${opened}/${packet.total_packet}个，共${yuan(openedAmount)}/${yuan(packet.total_amount)}元`;
      if (packet.status === "expired") text += "，已过期";
      if (packet.status === "refunded") text += `，已过期，${yuan(packet.remaining_amount)}元已退回`;
    }
    if (packet.kind && KIND_NAMES[packet.kind]) text = `${KIND_NAMES[packet.kind]} · ${text}`;
    $("summary").textContent = text;
  }

  function isLuckiest(packet, record) {
    if (record.luckiest === true) return true;
    return Boolean(packet.luckiest && packet.luckiest.uid === record.uid);
  }

  function renderRecords(packet, records) {
    const list = $("records");
    list.replaceChildren(
      ...records.map((r) => {
        const li = el("li");
        li.dataset.uid = r.uid;
        li.dataset.cents = String(r.amount);
        if (state.me && r.uid === state.me.uid) li.classList.add("mine");
        const who = el("span", "who-col");
        who.append(el("span", "name", r.nick_name || `用户 ${r.uid}`), el("span", "time", when(r.create_time)));
        const amt = el("span", "amt-col");
        amt.append(el("span", "amt", `${yuan(r.amount)}元`));
        if (isLuckiest(packet, r)) {
          li.classList.add("luckiest");
          amt.append(el("span", "badge", "手气最佳"));
        }
        li.append(avatar(r.nick_name), who, amt);
        return li;
      }),
    );
    $("records-state").textContent = records.length ? "" : "还没有人领取";
  }

  async function fetchRecords(id) {
    const records = [];
    let cursor = null;
    for (let page = 0; page < 20; page++) {
      const query = cursor ? `?limit=100&cursor=${encodeURIComponent(cursor)}` : "?limit=100";
      const { status, data } = await api("GET", `/v1/red-packets/${id}/records${query}`);
      if (status !== 200) break;
      records.push(...data.records);
      cursor = data.next_cursor;
      if (!cursor) break;
    }
    return records;
  }

  /** Fetch the packet and its records and draw them; refreshes itself while it is active. */
  async function refreshPacket(id, seq) {
    let packet;
    try {
      const { status, data } = await api("GET", `/v1/red-packets/${id}`);
      if (seq !== state.routeSeq) return;
      if (status !== 200) {
        if (status === 404 || status === 400) {
          $("greeting").textContent = "";
          $("sender-name").textContent = "";
          showOutcome("not_found");
          $("summary").textContent = "";
          return;
        }
        banner(errorText(data, `暂时无法读取这个红包 (${status})`));
        state.timer = setTimeout(() => refreshPacket(id, seq), REFRESH_MS * 2);
        return;
      }
      packet = data;
      const records = await fetchRecords(id);
      if (seq !== state.routeSeq) return;
      banner("");
      view.packet = packet;
      view.records = records;
      renderHeader(packet, records);
      renderSummary(packet, records);
      renderRecords(packet, records);
      const mine = state.me && records.find((r) => r.uid === state.me.uid);
      const envelopeState = $("envelope").dataset.state;
      if (!view.opening && envelopeState !== "opened") {
        if (mine) {
          showAmount(mine.amount, "你已经领过这个红包");
        } else if (packet.status !== "active") {
          showOutcome(packet.status, null, state.me.uid === packet.uid);
        } else if (
          packet.kind === "exclusive" &&
          packet.receiver_uid &&
          state.me.uid !== packet.receiver_uid
        ) {
          showOutcome("not_for_you");
        } else if (envelopeState === "loading") {
          setEnvelope("closed");
        }
      }
    } catch (err) {
      if (err instanceof SignedOut || seq !== state.routeSeq) return;
      banner(err.message);
    }
    if (seq === state.routeSeq && (!packet || packet.status === "active")) {
      state.timer = setTimeout(() => refreshPacket(id, seq), REFRESH_MS);
    }
  }

  function showPacket(id, seq) {
    show("packet");
    view.id = id;
    view.packet = null;
    view.mine = null;
    view.opening = false;
    $("outcome").hidden = true;
    $("amount-box").hidden = true;
    $("amount-note").hidden = true;
    $("sender-name").textContent = "";
    $("greeting").textContent = "";
    $("summary").textContent = "";
    $("records").replaceChildren();
    $("records-state").textContent = "";
    setEnvelope("loading");
    refreshPacket(id, seq);
  }

  /** 開: grab (is anything left for me?), then open (take my share). */
  async function tapOpen() {
    const id = view.id;
    const seq = state.routeSeq;
    if (view.opening || !id) return;
    view.opening = true;
    setEnvelope("opening");
    const started = performance.now();
    let outcome;
    try {
      const grab = await api("POST", `/v1/red-packets/${id}/grab`);
      if (grab.status === 200 && grab.data.can_open === false) {
        outcome = { reason: grab.data.reason, amount: grab.data.amount };
      } else if (grab.status !== 200) {
        outcome = { error: errorText(grab.data, `没抢到 (${grab.status})，请再试一次`) };
      } else {
        const open = await api("POST", `/v1/red-packets/${id}/open`);
        if (open.status === 200) {
          outcome = { amount: open.data.amount, replayed: open.data.replayed };
        } else if ((open.status === 410 || open.status === 403) && open.data && open.data.error) {
          outcome = { reason: open.data.error.code };
        } else {
          outcome = { error: errorText(open.data, `没拆开 (${open.status})，请再试一次`) };
        }
      }
    } catch (err) {
      if (err instanceof SignedOut) return;
      outcome = { error: err.message };
    }
    await sleep(Math.max(0, MIN_SPIN_MS - (performance.now() - started)));
    view.opening = false;
    if (seq !== state.routeSeq) return;
    if (outcome.error) {
      banner(outcome.error);
      setEnvelope("closed");
      return;
    }
    banner("");
    if (outcome.reason) {
      showOutcome(outcome.reason, outcome.amount);
    } else {
      showAmount(outcome.amount, outcome.replayed ? "你已经领过这个红包" : creditNote());
      if (!outcome.replayed) followCredit(seq);
    }
    clearTimeout(state.timer);
    refreshPacket(id, seq);
  }

  // -- my red packets ------------------------------------------------------------------------

  function currentYear() {
    // the calendar of the people this serves: UTC+8
    return new Date(Date.now() + 8 * 3600 * 1000).getUTCFullYear();
  }

  function showMe(seq) {
    show("me");
    document.title = "我的红包 · redpacket";
    if (!state.meYear) state.meYear = currentYear();
    $("year").textContent = `${state.meYear}年`;
    $("year-next").disabled = state.meYear >= currentYear();
    $("tab-received").setAttribute("aria-selected", String(state.meTab === "received"));
    $("tab-sent").setAttribute("aria-selected", String(state.meTab === "sent"));
    $("me-list").replaceChildren();
    $("me-total").textContent = "";
    $("me-sub").textContent = "";
    $("me-state").textContent = "加载中…";
    state.meCursor = null;
    loadMe(seq);
  }

  function receivedItem(r) {
    const li = el("li");
    li.dataset.packetId = r.red_packet_id;
    const link = el("a");
    link.href = `#/p/${r.red_packet_id}`;
    const name = (r.sender && r.sender.nick_name) || `用户 ${r.sender ? r.sender.uid : ""}`;
    const who = el("span", "who-col");
    who.append(
      el("span", "name", `${name} · ${KIND_NAMES[r.kind] || "红包"}`),
      el("span", "time", when(r.create_time)),
    );
    const amt = el("span", "amt-col");
    amt.append(el("span", "amt", `${yuan(r.amount)}元`));
    if (r.luckiest) amt.append(el("span", "badge", "手气最佳"));
    link.append(avatar(name), who, amt);
    li.append(link);
    return li;
  }

  const STATUS_NAMES = { active: "领取中", sold_out: "已领完", expired: "已过期", refunded: "已退回" };

  function sentItem(p) {
    const li = el("li");
    li.dataset.packetId = p.red_packet_id;
    const link = el("a");
    link.href = `#/p/${p.red_packet_id}`;
    const who = el("span", "who-col");
    who.append(
      el("span", "name", p.greeting || KIND_NAMES[p.kind] || "红包"),
      el(
        "span",
        "time",
        `${KIND_NAMES[p.kind] || "红包"} · ${when(p.create_time)} · ${STATUS_NAMES[p.status] || p.status}`,
      ),
    );
    const amt = el("span", "amt-col");
    amt.append(el("span", "amt", `${yuan(p.total_amount)}元`));
    amt.append(el("span", "time", `${p.opened_packet}/${p.total_packet}个`));
    if (p.refunded_amount > 0) amt.append(el("span", "time", `退回${yuan(p.refunded_amount)}元`));
    link.append(el("span", "avatar", KIND_NAMES[p.kind] ? KIND_NAMES[p.kind][0] : "红"), who, amt);
    li.append(link);
    return li;
  }

  async function loadMe(seq) {
    const tab = state.meTab;
    const query = `?year=${state.meYear}&limit=20${state.meCursor ? `&cursor=${encodeURIComponent(state.meCursor)}` : ""}`;
    $("me-more").hidden = true;
    try {
      const { status, data } = await api("GET", `/v1/me/${tab}${query}`);
      if (seq !== state.routeSeq || tab !== state.meTab) return;
      if (status === 404) {
        $("me-state").textContent = "这个服务器还没有「我的红包」";
        return;
      }
      if (status !== 200) {
        $("me-state").textContent = errorText(data, `暂时无法读取 (${status})`);
        return;
      }
      $("me-total").textContent = `${yuan(data.total_amount)}元`;
      $("me-total").dataset.cents = String(data.total_amount);
      $("me-sub").textContent =
        tab === "received"
          ? `${state.me.name || ""}共收到${data.count}个红包，手气最佳${data.luckiest_count}次`
          : `${state.me.name || ""}共发出${data.count}个红包`;
      const items = tab === "received" ? data.records.map(receivedItem) : data.packets.map(sentItem);
      $("me-list").append(...items);
      $("me-state").textContent = $("me-list").children.length ? "" : "这一年还没有红包";
      state.meCursor = data.next_cursor;
      $("me-more").hidden = !data.next_cursor;
    } catch (err) {
      if (!(err instanceof SignedOut) && seq === state.routeSeq) $("me-state").textContent = err.message;
    }
  }

  // -- wallet (零钱) ----------------------------------------------------------------------------

  const TXN_NAMES = { topup: "充值", grant: "初始零钱", send: "发红包", receive: "收红包", refund: "退回" };

  /** The balance in the bar (when the API has wallets); the wallet, or null. */
  async function refreshBalance() {
    if (!state.token || !(state.features && state.features.wallet)) return null;
    try {
      const { status, data } = await api("GET", "/v1/me/wallet");
      if (status !== 200) return null;
      $("balance").textContent = `¥${yuan(data.balance)}`;
      $("balance").dataset.cents = String(data.balance);
      $("balance").dataset.incoming = String(data.incoming);
      return data;
    } catch {
      return null;
    }
  }

  function creditNote() {
    return state.features && state.features.wallet ? "入账中…" : "已存入零钱";
  }

  /** After an open: "入账中" until the share is in the balance (incoming back to 0). */
  async function followCredit(seq) {
    if (!(state.features && state.features.wallet)) return;
    for (let i = 0; i < 60 && seq === state.routeSeq; i++) {
      const wallet = await refreshBalance();
      if (wallet && wallet.incoming === 0) {
        if (seq === state.routeSeq) $("amount-note").textContent = "已存入零钱";
        return;
      }
      await sleep(500);
    }
  }

  function txnItem(t) {
    const li = el("li");
    li.dataset.kind = t.kind;
    const row = t.red_packet_id && t.kind !== "topup" ? el("a") : el("span", "row-static");
    if (row.tagName === "A") row.href = `#/p/${t.red_packet_id}`;
    const who = el("span", "who-col");
    who.append(el("span", "name", TXN_NAMES[t.kind] || t.kind), el("span", "time", when(t.create_time)));
    const amt = el("span", "amt-col");
    amt.append(el("span", "amt", `${t.amount > 0 ? "+" : ""}${yuan(t.amount)}元`));
    amt.append(el("span", "time", `余额${yuan(t.balance_after)}元`));
    row.append(el("span", "avatar", (TXN_NAMES[t.kind] || "零")[0]), who, amt);
    li.append(row);
    return li;
  }

  function showWallet(seq) {
    show("wallet");
    document.title = "零钱明细 · redpacket";
    $("wallet-list").replaceChildren();
    $("wallet-state").textContent = "加载中…";
    state.walletCursor = null;
    refreshBalance().then((w) => {
      if (!w || seq !== state.routeSeq) return;
      $("wallet-balance").textContent = `${yuan(w.balance)}元`;
      $("wallet-balance").dataset.cents = String(w.balance);
      $("wallet-incoming").textContent = w.incoming ? `入账中 ${yuan(w.incoming)}元` : "";
    });
    loadWallet(seq);
  }

  async function loadWallet(seq) {
    const cursor = state.walletCursor ? `&cursor=${encodeURIComponent(state.walletCursor)}` : "";
    $("wallet-more").hidden = true;
    try {
      const { status, data } = await api("GET", `/v1/me/wallet/transactions?limit=20${cursor}`);
      if (seq !== state.routeSeq) return;
      if (status !== 200) {
        $("wallet-state").textContent = errorText(data, `暂时无法读取 (${status})`);
        return;
      }
      $("wallet-list").append(...data.transactions.map(txnItem));
      $("wallet-state").textContent = $("wallet-list").children.length ? "" : "还没有零钱明细";
      state.walletCursor = data.next_cursor;
      $("wallet-more").hidden = !data.next_cursor;
    } catch (err) {
      if (!(err instanceof SignedOut) && seq === state.routeSeq) $("wallet-state").textContent = err.message;
    }
  }

  // -- start ---------------------------------------------------------------------------------

  function wire() {
    $("signin-form").addEventListener("submit", signIn);
    $("token-form").addEventListener("submit", pasteToken);
    $("who").addEventListener("click", () => signOut(""));
    $("send-form").addEventListener("submit", send);
    for (const id of ["send-amount", "send-shares"]) $(id).addEventListener("input", updateTotal);
    for (const button of $("kinds").querySelectorAll("button")) {
      button.addEventListener("click", () => setKind(button.dataset.kind));
    }
    $("copy-link").addEventListener("click", (e) => copy($("sent-link").textContent, e.currentTarget));
    $("copy-packet-link").addEventListener("click", (e) =>
      copy(`${location.origin}/app/#/p/${view.id}`, e.currentTarget),
    );
    $("open-button").addEventListener("click", tapOpen);
    $("year-prev").addEventListener("click", () => {
      state.meYear -= 1;
      route();
    });
    $("year-next").addEventListener("click", () => {
      state.meYear = Math.min(currentYear(), state.meYear + 1);
      route();
    });
    $("tab-received").addEventListener("click", () => {
      state.meTab = "received";
      route();
    });
    $("tab-sent").addEventListener("click", () => {
      state.meTab = "sent";
      route();
    });
    $("me-more").addEventListener("click", () => loadMe(state.routeSeq));
    $("wallet-more").addEventListener("click", () => loadWallet(state.routeSeq));
    window.addEventListener("hashchange", route);
  }

  async function start() {
    wire();
    const saved = sessionStorage.getItem(TOKEN_KEY);
    if (saved && !useToken(saved)) sessionStorage.removeItem(TOKEN_KEY);
    await loadFeatures();
    route();
    document.body.dataset.ready = "true";
  }

  start();
})();
