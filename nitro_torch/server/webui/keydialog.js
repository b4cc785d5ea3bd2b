// The API key prompt: shown when the server answers 401. A key is kept only once the server accepts it.

import { fetchModels } from "./api.js";
import { getApiKey, setApiKey } from "./store.js";

const $ = (id) => document.getElementById(id);
let pending = null;

function showError(text) {
  const error = $("api-key-error");
  error.textContent = text;
  error.hidden = !text;
}

/** Tries `key`; resolves to the model ids, or null after showing why the key was refused. */
async function tryKey(key) {
  const previous = getApiKey();
  setApiKey(key);
  try {
    return await fetchModels();
  } catch (error) {
    setApiKey(previous === key ? "" : previous);
    showError(error.unauthorized ? `The server refused this key: ${error.message}` : error.message);
    return null;
  }
}

/**
 * Asks for an API key and checks it against /v1/models. Resolves to the model ids once a key works,
 * or null when the user cancels. Concurrent callers share one dialog.
 */
export function askForApiKey(reason) {
  if (pending) return pending;
  const dialog = $("api-key-dialog");
  const form = $("api-key-form");
  const input = $("api-key-input");
  $("api-key-reason").textContent = reason || "This server needs an API key.";
  showError("");
  input.value = "";
  pending = new Promise((resolve) => {
    const finish = (models) => {
      form.removeEventListener("submit", onSubmit);
      $("api-key-cancel").removeEventListener("click", onCancel);
      dialog.removeEventListener("cancel", onCancel);
      if (dialog.open) dialog.close();
      pending = null;
      resolve(models);
    };
    async function onSubmit(event) {
      event.preventDefault();
      const key = input.value.trim();
      if (!key) {
        showError("Enter a key.");
        return;
      }
      $("api-key-save").disabled = true;
      const models = await tryKey(key);
      $("api-key-save").disabled = false;
      if (models) finish(models);
      else input.select();
    }
    function onCancel(event) {
      event.preventDefault();
      finish(null);
    }
    form.addEventListener("submit", onSubmit);
    $("api-key-cancel").addEventListener("click", onCancel);
    dialog.addEventListener("cancel", onCancel);
  });
  dialog.showModal();
  input.focus();
  return pending;
}
