// The insurance-fund dashboard: reads the JSON endpoints beside this page and draws its own
// SVG charts (no build step, no library). Money arrives as strings of minor units and is kept
// in BigInt, so no amount beyond 2^53 is rounded; only pixel positions use Number.
"use strict";

(() => {
  const SVG = "http://www.w3.org/2000/svg";
  const TOKEN_KEY = "ledger.dashboard.token";
  const CURVE_POINTS = 400;
  const KIND_LABELS = {
    ENTRY_KIND_LIQUIDATION_PROFIT: "inflows (liquidation profits)",
    ENTRY_KIND_INSURANCE_COVER: "covers",
    ENTRY_KIND_FUND_DEPOSIT: "deposits",
    ENTRY_KIND_FUND_WITHDRAWAL: "withdrawals",
  };

  const state = { scale: 0, currency: "", generation: 0, cycle: "" };
  const $ = (id) => document.getElementById(id);

  // --- the token: from ?token= once, then kept for the tab's session only --------------

  function takeTokenFromUrl() {
    const url = new URL(window.location.href);
    if (!url.searchParams.has("token")) return;
    const token = url.searchParams.get("token").trim();
    if (token) sessionStorage.setItem(TOKEN_KEY, token);
    url.searchParams.delete("token");
    history.replaceState(null, "", url.pathname + url.search + url.hash);
  }

  function token() {
    return sessionStorage.getItem(TOKEN_KEY) || "";
  }

  class ApiError extends Error {
    constructor(status, code, message) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }

  async function api(path) {
    const headers = { Accept: "application/json" };
    if (token()) headers.Authorization = "Bearer " + token();
    const response = await fetch(path, { headers, cache: "no-store" });
    const body = await response.json().catch(() => null);
    if (!response.ok) {
      const error = (body && body.error) || { code: String(response.status), message: "" };
      throw new ApiError(response.status, error.code, error.message || response.statusText);
    }
    return body;
  }

  // --- numbers ----------------------------------------------------------------------------

  /** Minor units (a string or BigInt) as a decimal at the currency's scale, grouped; as
   * they are when the scale is not known (null). */
  function money(minor, scale = state.scale ?? 0) {
    let value = BigInt(minor);
    const negative = value < 0n;
    if (negative) value = -value;
    let digits = value.toString();
    let fraction = "";
    if (scale > 0) {
      digits = digits.padStart(scale + 1, "0");
      fraction = "." + digits.slice(-scale);
      digits = digits.slice(0, -scale);
    }
    const grouped = digits.replace(/\B(?=(\d{3})+(?!\d))/g, ",");
    return (negative ? "-" : "") + grouped + fraction;
  }

  /** A decimal string ("0.842105263158") as a percentage string, exactly. */
  function percent(decimal) {
    const [whole, fraction = ""] = String(decimal).split(".");
    const padded = fraction.padEnd(2, "0");
    const head = (whole + padded.slice(0, 2)).replace(/^0+(?=\d)/, "");
    const rest = padded.slice(2).replace(/0+$/, "");
    return head + (rest ? "." + rest : "") + " %";
  }

  /** Pixels only: the nearest double is plenty. */
  const toNumber = (minor) => Number(BigInt(minor));

  function axisLabel(value) {
    const major = value / 10 ** (state.scale ?? 0);
    return major.toLocaleString("en", { notation: "compact", maximumFractionDigits: 2 });
  }

  function niceTicks(low, high, count) {
    if (high <= low) return [low];
    const raw = (high - low) / count;
    const power = 10 ** Math.floor(Math.log10(raw));
    const step = [1, 2, 5, 10].map((m) => m * power).find((s) => s >= raw) || raw;
    const ticks = [];
    for (let t = Math.ceil(low / step) * step; t <= high + step * 1e-9; t += step) ticks.push(t);
    return ticks;
  }

  const shortTime = (iso) => (iso ? iso.replace("T", " ").replace(/(\.\d+)?Z$/, "") : "");

  // --- SVG --------------------------------------------------------------------------------

  function el(name, attributes = {}, text = "") {
    const node = document.createElementNS(SVG, name);
    for (const [key, value] of Object.entries(attributes)) node.setAttribute(key, value);
    if (text) node.textContent = text;
    return node;
  }

  function html(name, attributes = {}, text = "") {
    const node = document.createElement(name);
    for (const [key, value] of Object.entries(attributes)) node.setAttribute(key, value);
    if (text) node.textContent = text;
    return node;
  }

  const kindClass = (kind) => (kind in KIND_LABELS ? "kind-" + kind : "kind-other");

  // --- the fund ---------------------------------------------------------------------------

  function drawFund(fund) {
    const points = fund.points;
    const box = $("fund-chart");
    box.replaceChildren();
    const width = Math.max(box.clientWidth || 900, 480);
    const height = 320;
    const margin = { left: 72, right: 16, top: 12, bottom: 36 };
    const svg = el("svg", {
      viewBox: `0 0 ${width} ${height}`,
      "data-fund-chart": fund.currency,
      "data-points": String(points.length),
      role: "img",
      "aria-label": "insurance fund balance after each entry",
    });
    box.append(svg);
    if (!points.length) {
      svg.append(el("text", { x: width / 2, y: height / 2, class: "empty",
        "text-anchor": "middle" }, "no fund entries yet"));
      return;
    }
    const balances = points.map((p) => toNumber(p.balance));
    const low = Math.min(0, ...balances);
    const high = Math.max(...balances, low + 1);
    const plotW = width - margin.left - margin.right;
    const plotH = height - margin.top - margin.bottom;
    const step = points.length === 1 ? 0 : plotW / (points.length - 1);
    const x = (i) => margin.left + (points.length === 1 ? plotW / 2 : i * step);
    const y = (v) => margin.top + plotH - ((v - low) * plotH) / (high - low);

    const grid = el("g", { class: "grid axis" });
    for (const tick of niceTicks(low, high, 5)) {
      const at = y(tick);
      grid.append(el("line", { x1: margin.left, x2: width - margin.right, y1: at, y2: at }));
      grid.append(el("text", { x: margin.left - 6, y: y(tick) + 4, "text-anchor": "end" },
        axisLabel(tick)));
    }
    const labels = Math.min(points.length, 6);
    for (let n = 0; n < labels; n++) {
      const i = labels === 1 ? 0 : Math.round((n * (points.length - 1)) / (labels - 1));
      // The outer labels lean inwards, so that none runs past the edges.
      let anchor = "middle";
      if (labels > 1 && n === 0) anchor = "start";
      if (labels > 1 && n === labels - 1) anchor = "end";
      const when = shortTime(points[i].time);
      const at = { x: x(i), "text-anchor": anchor };
      grid.append(el("text", { ...at, y: height - 18 }, when.slice(0, 10)));
      grid.append(el("text", { ...at, y: height - 5 }, when.slice(11)));
    }
    svg.append(grid);

    // The balance holds between entries: a step from each point to the next.
    let path = `M${x(0)},${y(0)}V${y(balances[0])}`;
    for (let i = 1; i < points.length; i++) path += `H${x(i)}V${y(balances[i])}`;
    svg.append(el("path", { d: path, class: "balance" }));

    const radius = points.length > 2000 ? 1.5 : 3.5;
    const dots = el("g", { class: "points" });
    points.forEach((p, i) => {
      const dot = el("circle", {
        cx: x(i), cy: y(balances[i]), r: radius, class: kindClass(p.kind),
        "data-entry-id": p.entry_id, "data-kind": p.kind, "data-balance": p.balance,
      });
      dot.append(el("title", {}, `#${p.entry_id} ${KIND_LABELS[p.kind] || p.kind} ` +
        `${money(p.amount)} → ${money(p.balance)}\n${shortTime(p.time)} UTC  ${p.reference}`));
      dots.append(dot);
    });
    svg.append(dots);
  }

  function showFundTotals(fund) {
    const points = fund.points;
    const last = points.length ? points[points.length - 1].balance : "0";
    const unit = state.scale === null ? " (minor units)" : "";
    $("fund-balance").textContent = `${money(last)} ${fund.currency}${unit}`;
    $("fund-balance").dataset.balance = last;
    const sums = new Map(Object.keys(KIND_LABELS).map((kind) => [kind, [0n, 0]]));
    for (const p of points) {
      const sum = sums.get(p.kind) || [0n, 0];
      sums.set(p.kind, [sum[0] + BigInt(p.amount), sum[1] + 1]);
    }
    const totals = $("fund-totals");
    totals.replaceChildren();
    for (const [kind, [sum, count]] of sums) {
      const item = html("span", { class: "total", "data-kind": kind, "data-total": String(sum) });
      item.append(html("span", { class: "swatch " + kindClass(kind) }));
      item.append(document.createTextNode(
        `${KIND_LABELS[kind] || kind}: ${money(sum)} (${count})`));
      totals.append(item);
    }
    $("fund-note").textContent = fund.truncated
      ? `The newest ${points.length} of ${fund.entries_total} entries (balances exact).`
      : `${points.length} entries, one point each.`;
  }

  // --- cycles -----------------------------------------------------------------------------

  function showCycles(reply) {
    const body = $("cycle-table").tBodies[0];
    body.replaceChildren();
    for (const c of reply.cycles) {
      const row = html("tr", { "data-cycle-id": c.cycle_id });
      const cells = [
        [c.cycle_id, ""],
        [shortTime(c.closed_at), ""],
        [c.state.replace("CYCLE_STATE_", "").toLowerCase(), ""],
        [money(c.loss_total), "num"],
        [money(c.fund_paid), "num"],
        [money(c.allocated_total), "num"],
        [money(c.uncovered), "num"],
        [`${c.participant_count} / ${c.profitable_count}`, "num"],
        [percent(c.allocation_rate), "num"],
      ];
      for (const [text, cls] of cells) row.append(html("td", cls ? { class: cls } : {}, text));
      const cell = html("td");
      const button = html("button", { type: "button", "data-select-cycle": c.cycle_id }, "Show");
      cell.append(button);
      row.append(cell);
      row.addEventListener("click", () => selectCycle(c.cycle_id));
      body.append(row);
    }
    $("cycles-note").textContent = reply.cycles.length
      ? "Select a cycle for its concentration curve and allocations."
      : "No closed cycle yet.";
  }

  async function selectCycle(cycleId) {
    const generation = state.generation;
    state.cycle = cycleId;
    for (const row of $("cycle-table").tBodies[0].rows) {
      row.classList.toggle("selected", row.dataset.cycleId === cycleId);
    }
    setStatus(`Loading cycle ${cycleId}…`);
    try {
      const path = `/api/currencies/${encodeURIComponent(state.currency)}/cycles/` +
        `${encodeURIComponent(cycleId)}/concentration?points=${CURVE_POINTS}`;
      const reply = await api(path);
      if (generation !== state.generation || state.cycle !== cycleId) return;
      $("cycle").hidden = false;
      $("cycle-title").textContent = `${cycleId} (${state.currency})`;
      drawConcentration(reply);
      showCycleDetails(reply);
      setStatus("");
    } catch (error) {
      failed(error);
    }
  }

  function drawConcentration(reply) {
    const box = $("concentration-chart");
    box.replaceChildren();
    const size = 440;
    const m = { left: 48, right: 16, top: 16, bottom: 40 };
    const plot = size - m.left - m.right;
    const x = (share) => m.left + share * plot;
    const y = (share) => m.top + plot - share * plot;
    const svg = el("svg", {
      viewBox: `0 0 ${size} ${m.top + plot + m.bottom}`,
      "data-cycle-id": reply.cycle_id,
      role: "img",
      "aria-label": "concentration curve of the cycle's profit",
    });
    box.append(svg);
    const axis = el("g", { class: "axis grid" });
    for (const share of [0, 0.25, 0.5, 0.75, 1]) {
      axis.append(el("line", { x1: x(share), x2: x(share), y1: y(0), y2: y(1) }));
      axis.append(el("line", { x1: x(0), x2: x(1), y1: y(share), y2: y(share) }));
      axis.append(el("text", { x: x(share), y: y(0) + 14, "text-anchor": "middle" },
        `${share * 100}%`));
      axis.append(el("text", { x: x(0) - 6, y: y(share) + 4, "text-anchor": "end" },
        `${share * 100}%`));
    }
    axis.append(el("text", { x: x(0.5), y: y(0) + 32, "text-anchor": "middle" },
      "share of profitable positions, most profitable first"));
    svg.append(axis);
    svg.append(el("line", { x1: x(0), y1: y(0), x2: x(1), y2: y(1), class: "equality" }));

    const points = reply.points;
    const cut = reply.cut;
    const line = (from, to) => points.slice(from, to + 1).map((p) => `${x(p.x)},${y(p.y)}`);
    // Exact over the allocation rows; straight (dashed) where only sums are known.
    svg.append(el("polyline", {
      class: "curve",
      points: line(0, reply.allocated_index).join(" "),
      "data-concentration-curve": reply.cycle_id,
      "data-points": String(points.length),
    }));
    if (reply.allocated_index < cut.index) {
      svg.append(el("polyline", {
        class: "tail",
        points: line(reply.allocated_index, cut.index).join(" "),
        "data-tail": "allocated-zero",
      }));
    }
    if (cut.index < points.length - 1) {
      svg.append(el("polyline", {
        class: "tail",
        points: line(cut.index, points.length - 1).join(" "),
        "data-tail": "below-cut",
      }));
    }
    svg.append(el("line", { x1: x(cut.x), x2: x(cut.x), y1: y(0), y2: y(1), class: "cut-line" }));
    const marker = el("circle", {
      cx: x(cut.x), cy: y(cut.y), r: 5, class: "cut",
      "data-cut": `${cut.positions}/${reply.summary.profitable_count}`,
    });
    const label = `cut: top ${cut.positions} of ${reply.summary.profitable_count} positions ` +
      `hold ${(cut.y * 100).toFixed(2)}% of the profit`;
    marker.append(el("title", {}, label));
    svg.append(marker);
    // Under the diagonal, lower right: where a concentration curve never runs.
    svg.append(el("text", {
      x: x(1) - 6, y: y(0) - 10, "text-anchor": "end", class: "cut-label",
    }, label));
  }

  function showCycleDetails(reply) {
    const s = reply.summary;
    const rows = [
      ["Closed", `${shortTime(s.closed_at)} UTC (close ${s.version})`],
      ["Loss", money(s.loss_total)],
      ["Fund before", money(s.fund_balance_before)],
      ["Fund share", `${money(s.fund_share)} (insurance share ${s.insurance_share})`],
      ["Fund paid", money(s.fund_paid)],
      ["Due from users", money(s.user_due)],
      ["Allocated", money(s.allocated_total)],
      ["Uncovered", money(s.uncovered)],
      ["Positions", s.positions_total],
      ["Profitable", `${s.profitable_count} holding ${money(s.profit_total)}`],
      ["Participants", `${s.participant_count} holding ${money(s.participant_profit)}` +
        ` (coverage ratio ${s.coverage_ratio}${s.widened ? ", widened" : ""})`],
      ["Cutoff pnl", money(s.cutoff_pnl)],
      ["Allocation rate", `${s.allocation_rate} (${percent(s.allocation_rate)})`],
      ["Allocated 0", `${reply.unallocated.positions} participants holding ` +
        money(reply.unallocated.profit)],
      ["Below the cut", `${reply.tail.positions} positions holding ${money(reply.tail.profit)}`],
    ];
    const list = $("cycle-summary");
    list.replaceChildren();
    for (const [term, value] of rows) {
      list.append(html("dt", {}, term));
      list.append(html("dd", {}, String(value)));
    }
    const body = $("allocation-table").tBodies[0];
    body.replaceChildren();
    for (const a of reply.allocations.largest) {
      const row = html("tr", { "data-position-id": a.position_id });
      for (const text of [a.position_id, a.account_id, money(a.pnl), money(a.amount)]) {
        row.append(html("td", { class: "num" }, text));
      }
      body.append(row);
    }
  }

  // --- the page ---------------------------------------------------------------------------

  function setStatus(text) {
    $("status").textContent = text;
  }

  function failed(error) {
    document.body.dataset.state = "error";
    const hint = error.status === 401 ? " Paste a reader token above."
      : error.status === 403 ? " This token's role may not read this." : "";
    setStatus(`${error.code || "ERROR"}: ${error.message}${hint}`);
  }

  async function loadCurrency(code) {
    const generation = ++state.generation;
    state.currency = code;
    state.cycle = "";
    const option = [...$("currency").options].find((o) => o.value === code);
    // No scale known (a token that may not list currencies): minor units, as they are.
    state.scale = option && option.dataset.scale !== "" ? Number(option.dataset.scale) : null;
    document.body.dataset.state = "loading";
    $("cycle").hidden = true;
    setStatus(`Loading ${code}…`);
    try {
      const base = `/api/currencies/${encodeURIComponent(code)}`;
      const [fund, cycles] = await Promise.all([
        api(`${base}/fund-history`),
        api(`${base}/cycles`),
      ]);
      if (generation !== state.generation) return;
      drawFund(fund);
      showFundTotals(fund);
      showCycles(cycles);
      document.body.dataset.currency = code;
      document.body.dataset.state = "ready";
      setStatus("");
    } catch (error) {
      if (generation === state.generation) failed(error);
    }
  }

  async function start() {
    document.body.dataset.state = "loading";
    setStatus("Loading currencies…");
    const wanted = decodeURIComponent(window.location.hash.slice(1));
    let note = "";
    try {
      let reply;
      try {
        reply = await api("/api/currencies");
      } catch (error) {
        // The contract lists currencies in Admin only: a reader's token is refused there.
        // The currency named in the address (#CODE) can still be read, in minor units.
        if (error.status !== 403) throw error;
        if (!wanted) {
          error.message += " Open the page as /#CODE to view one currency in minor units.";
          throw error;
        }
        reply = { currencies: [{ code: wanted, scale: null }] };
        note = "This token may not list currencies: amounts in minor units.";
      }
      const select = $("currency");
      select.replaceChildren();
      for (const c of reply.currencies) {
        const scale = c.scale === null ? "" : String(c.scale);
        select.append(html("option", { value: c.code, "data-scale": scale }, c.code));
      }
      select.disabled = !reply.currencies.length;
      if (!reply.currencies.length) {
        document.body.dataset.state = "ready";
        setStatus("No currency yet.");
        return;
      }
      const known = reply.currencies.some((c) => c.code === wanted);
      const code = known ? wanted : reply.currencies[0].code;
      select.value = code;
      await loadCurrency(code);
      if (note && document.body.dataset.state === "ready") setStatus(note);
    } catch (error) {
      failed(error);
    }
  }

  document.addEventListener("DOMContentLoaded", () => {
    takeTokenFromUrl();
    $("token").value = token();
    $("token-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const value = $("token").value.trim();
      if (value) sessionStorage.setItem(TOKEN_KEY, value);
      else sessionStorage.removeItem(TOKEN_KEY);
      start();
    });
    $("token-forget").addEventListener("click", () => {
      sessionStorage.removeItem(TOKEN_KEY);
      $("token").value = "";
    });
    $("currency").addEventListener("change", (event) => {
      history.replaceState(null, "", "#" + encodeURIComponent(event.target.value));
      loadCurrency(event.target.value);
    });
    start();
  });
})();
