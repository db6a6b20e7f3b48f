// Upload a raw disk image as the request body (streamed by the server, never a form copy).
"use strict";
(function () {
  const form = document.getElementById("upload");
  const status = document.getElementById("upload-status");
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const name = form.elements.name.value.trim(), file = form.elements.file.files[0];
    if (!name || !file) { status.textContent = "Give a name and choose a file."; return; }
    status.textContent = `Uploading ${file.name} (${(file.size / 1048576).toFixed(1)} MiB) and capturing…`;
    const resp = await fetch(`${form.dataset.action}?name=${encodeURIComponent(name)}`, {
      method: "POST", body: file, credentials: "same-origin",
      headers: {"Content-Type": "application/octet-stream", "X-CSRF-Token": form.dataset.csrf},
    });
    if (resp.ok) { location.reload(); return; }
    const text = await resp.text();
    let detail = text;
    try { detail = JSON.parse(text).detail; } catch (_) { /* an HTML error page */ }
    status.textContent = `Upload failed (${resp.status}): ${String(detail).replace(/<[^>]+>/g, " ").trim().slice(0, 300)}`;
  });
})();
