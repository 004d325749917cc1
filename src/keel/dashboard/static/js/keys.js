// Keys: the tenant's virtual keys (all tenants' with the master key); create one (its secret shown once) or revoke one.
import { badge, del, el, fmt, get, post, problem, table, tenant } from "./common.js";

export const filtered = false;

export async function render(main) {
  const list = el("div", { id: "key-list" });
  const made = el("div", { id: "key-made", role: "status" });
  const fields = {
    tenant: el("input", { name: "tenant", required: !tenant, value: tenant || "", disabled: Boolean(tenant) }),
    owner: el("input", { name: "owner", placeholder: "alice@example.com" }),
    label: el("input", { name: "label", placeholder: "what it is for" }),
    models: el("input", { name: "models", placeholder: "all (or: chat, embed)" }),
    requests_per_minute: el("input", { name: "requests_per_minute", type: "number", min: 1, size: 6 }),
    admin: el("input", { name: "admin", type: "checkbox" }),
  };
  const form = el("form", { class: "filters panel", id: "new-key", onsubmit: async (e) => {
    e.preventDefault();
    const spec = { tenant: tenant ? undefined : fields.tenant.value.trim(), owner: fields.owner.value.trim() || undefined,
                   label: fields.label.value.trim() || undefined, admin: fields.admin.checked };
    const models = fields.models.value.split(",").map((m) => m.trim()).filter(Boolean);
    if (models.length) spec.models = models;
    if (fields.requests_per_minute.value) spec.requests_per_minute = Number(fields.requests_per_minute.value);
    try {
      const key = await post("/admin/keys", spec);
      made.replaceChildren(el("p", { class: "secret" }, `Key ${key.id} made. Its secret is shown this once: `,
        el("code", { id: "new-secret" }, key.key)));
      form.reset();
      if (tenant) fields.tenant.value = tenant;
      await load();
    } catch (error) { made.replaceChildren(problem("The key was not made", error)); }
  } },
    el("label", {}, "Tenant", fields.tenant), el("label", {}, "Owner", fields.owner), el("label", {}, "Label", fields.label),
    el("label", {}, "Models", fields.models), el("label", {}, "Requests/min", fields.requests_per_minute),
    el("label", {}, "Admin", fields.admin), el("button", { type: "submit", class: "primary" }, "Create key"));
  main.append(el("h2", {}, "New key"), form, made, el("h2", {}, "Keys"), list);

  async function load() {
    const keys = (await get("/admin/keys")).data;
    list.replaceChildren(table([
      { label: "Id", value: (k) => el("span", { class: "mono" }, k.id) },
      { label: "Tenant", value: (k) => k.tenant },
      { label: "Owner", value: (k) => k.owner ?? "" },
      { label: "Label", value: (k) => k.label ?? "" },
      { label: "Key", value: (k) => el("span", { class: "mono" }, k.hint) },
      { label: "Models", value: (k) => (k.models ? k.models.join(", ") : "all") },
      { label: "Admin", value: (k) => (k.admin ? "yes" : "") },
      { label: "Created", value: (k) => fmt.time(k.created_at) },
      { label: "State", value: (k) => (k.revoked_at ? badge("revoked", "fail") : k.expires_at && k.expires_at < Date.now() / 1000 ? badge("expired", "warn") : badge("active", "ok")) },
      { label: "", value: (k) => (k.revoked_at ? "" : el("button", { type: "button", class: "danger", "data-revoke": k.id,
          onclick: async (e) => {
            if (!confirm(`Revoke ${k.id}? Calls with it are refused from now on.`)) return;
            e.target.disabled = true;
            try { await del(`/admin/keys/${encodeURIComponent(k.id)}`); await load(); }
            catch (error) { e.target.disabled = false; made.replaceChildren(problem("Not revoked", error)); }
          } }, "Revoke")) },
    ], keys, { attrs: { id: "keys" }, rowAttrs: (k) => ({ "data-key": k.id }), empty: "No virtual key yet." }));
  }
  try { await load(); } catch (error) {
    list.replaceChildren(problem("Keys", error.code === "keys_unavailable" || error.status === 404
      ? { message: "Virtual keys are off on this gateway (auth: virtual_keys: true in keel.yaml turns them on)." } : error));
  }
}
