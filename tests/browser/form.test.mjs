// The visitor page in a real headless Chromium (Debian's package), driven by playwright-core:
// axe-core WCAG 2.1 AA checks on the empty form, the form with errors and the thank-you page; a
// keyboard-only submission; phone (375 px) and desktop widths with screenshots; and the page without
// JavaScript. Started by tests/browser.rs, which runs the service and passes BASE_URL and LINKS.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { readFileSync, mkdirSync } from "node:fs";
import { createRequire } from "node:module";
import { chromium } from "playwright-core";

const require = createRequire(import.meta.url);
const axeSource = readFileSync(require.resolve("axe-core/axe.min.js"), "utf8");
const BASE = process.env.BASE_URL;
const LINKS = JSON.parse(process.env.LINKS || "[]");
const ART = process.env.ARTIFACTS || "test-artifacts";
mkdirSync(ART, { recursive: true });
const WCAG = ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa"];

let browser;
before(async () => {
  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run", "--disable-component-update", "--disable-sync", "--disable-quic"],
  });
});
after(async () => { await browser?.close(); });

// axe is injected as an inline script, which the page's CSP forbids; the audit context bypasses CSP.
async function page(width, opts = {}) {
  const ctx = await browser.newContext({ viewport: { width, height: 900 }, bypassCSP: true, ...opts });
  return [ctx, await ctx.newPage()];
}

async function axe(p, name) {
  await p.addScriptTag({ content: axeSource });
  const result = await p.evaluate(async (tags) => {
    // eslint-disable-next-line no-undef
    const r = await axe.run(document, { runOnly: { type: "tag", values: tags } });
    return r.violations.map((v) => ({ id: v.id, impact: v.impact, help: v.help, nodes: v.nodes.map((n) => n.target.join(" ")) }));
  }, WCAG);
  assert.deepEqual(result, [], `${name}: axe violations ${JSON.stringify(result, null, 2)}`);
}

function link(i) {
  assert.ok(LINKS[i], `link ${i} passed by the Rust side`);
  return BASE + LINKS[i];
}

// Follows the chat's link: its page spends nothing and has one button; the visitor's click opens the form.
async function openForm(p, i, check) {
  await p.goto(link(i));
  await p.waitForSelector("button:has-text('Open the secure form')");
  if (check) await axe(p, "link page");
  await p.click("button:has-text('Open the secure form')");
  await p.waitForSelector("button:has-text('Send securely')");
  // The button is in the DOM before the stylesheet has loaded; measure the page as it is shown.
  await p.waitForLoadState("load");
}

test("empty form, form with errors and thank-you page have no WCAG 2.1 AA violations", async () => {
  const [ctx, p] = await page(1280);
  await openForm(p, 0, true);
  await axe(p, "empty form");
  await p.screenshot({ path: `${ART}/form-desktop.png`, fullPage: true });

  await p.click("button[type=submit]");
  await p.waitForSelector("#error-summary");
  assert.equal(await p.evaluate(() => document.activeElement?.id), "error-summary", "the error summary takes focus");
  assert.match(await p.title(), /^Error: /);
  const invalid = await p.locator("[aria-invalid=true]").count();
  assert.ok(invalid >= 3, `fields marked invalid: ${invalid}`);
  await axe(p, "form with errors");
  await p.screenshot({ path: `${ART}/form-errors-desktop.png`, fullPage: true });

  // The summary links move focus to the field.
  await p.click("#error-summary a >> nth=0");
  const focused = await p.evaluate(() => document.activeElement?.id);
  assert.ok(focused?.startsWith("f-"), `summary link focuses a field, got ${focused}`);

  await p.fill("#f-cardholder", "Ada Lovelace");
  await p.fill("#f-pan", "4111111111111111");
  assert.equal(await p.inputValue("#f-pan"), "4111 1111 1111 1111", "script groups card digits as typed");
  await p.fill("#f-expiry", "12/39");
  await p.fill("#f-cvv", "737");
  await p.click("button[type=submit]");
  await p.waitForSelector("h1:has-text('Thank you')");
  await axe(p, "thank-you page");
  await p.screenshot({ path: `${ART}/thank-you-desktop.png`, fullPage: true });
  await ctx.close();
});

test("a keyboard alone fills and submits the form (Tab, typing, Space, Enter)", async () => {
  const [ctx, p] = await page(1280);
  await p.goto(link(1)); // identity: SSN, secret answer, a single choice
  // The link's page opens the form from the keyboard too.
  await p.keyboard.press("Tab");
  assert.equal(await p.evaluate(() => document.activeElement?.textContent?.trim()), "Open the secure form");
  await p.keyboard.press("Enter");
  await p.waitForSelector("button:has-text('Send securely')");
  const tabTo = async (id) => {
    for (let i = 0; i < 20; i++) {
      await p.keyboard.press("Tab");
      if ((await p.evaluate(() => document.activeElement?.id)) === id) return;
    }
    assert.fail(`Tab never reached #${id}`);
  };
  await tabTo("f-ssn");
  await p.keyboard.type("123-45-6789");
  await tabTo("f-secret");
  await p.keyboard.type("my first dog");
  await tabTo("f-contact-0");
  await p.keyboard.press("Space");
  assert.equal(await p.isChecked("#f-contact-0"), true, "Space selects the radio");
  await p.keyboard.press("Tab");
  assert.equal(await p.evaluate(() => document.activeElement?.tagName), "BUTTON", "Tab reaches the submit button");
  await p.keyboard.press("Enter");
  await p.waitForSelector("h1:has-text('Thank you')");
  await ctx.close();
});

test("at phone width (375 px) nothing scrolls sideways and targets stay usable", async () => {
  const [ctx, p] = await page(375, { isMobile: true, hasTouch: true, deviceScaleFactor: 2 });
  await openForm(p, 2, true);
  const overflow = await p.evaluate(() => document.documentElement.scrollWidth - document.documentElement.clientWidth);
  assert.ok(overflow <= 0, `horizontal overflow ${overflow}px`);
  const button = await p.locator("button[type=submit]").boundingBox();
  assert.ok(button.height >= 44, `submit button is ${button.height}px tall`);
  await axe(p, "empty form at 375px");
  await p.screenshot({ path: `${ART}/form-phone.png`, fullPage: true });
  await p.click("button[type=submit]");
  await p.waitForSelector("#error-summary");
  await axe(p, "form with errors at 375px");
  await p.screenshot({ path: `${ART}/form-errors-phone.png`, fullPage: true });
  await ctx.close();
});

test("the form works without JavaScript", async () => {
  const ctx = await browser.newContext({ javaScriptEnabled: false, viewport: { width: 1024, height: 800 } });
  const p = await ctx.newPage();
  await openForm(p, 3, false);
  await p.fill("#f-cardholder", "No Script");
  await p.fill("#f-pan", "5555 5555 5555 4444");
  await p.fill("#f-expiry", "01/40");
  await p.fill("#f-cvv", "123");
  await p.click("button[type=submit]");
  await p.waitForSelector("h1:has-text('Thank you')");
  await ctx.close();
});

test("the page's content security policy blocks inline script", async () => {
  const ctx = await browser.newContext();
  const p = await ctx.newPage();
  const violations = [];
  p.on("console", (m) => { if (/Content Security Policy/i.test(m.text())) violations.push(m.text()); });
  await openForm(p, 4, false);
  const ran = await p.evaluate(() => {
    const s = document.createElement("script");
    s.textContent = "window.__inlineRan = true";
    document.head.appendChild(s);
    return window.__inlineRan === true;
  });
  assert.equal(ran, false, "inline script must not run");
  await ctx.close();
});
