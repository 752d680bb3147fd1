namespace agentsmithy {
namespace detail {

// ===========================================================================
// AgentSmithy's dialogs REST API (/api/dialogs...)
// ===========================================================================

// There is always a current dialog (AgentSmithy's clients need one): the
// current one if it still exists, else the most recently updated, else a new
// one. The caller holds Core::current_dialog_mu.
inline std::string ensure_current_dialog(DialogStore& store) {
  if (const auto current = store.current_dialog(); current && store.find_dialog(*current)) {
    return *current;
  }
  const auto dialogs = store.list_dialogs();
  const std::string id =
      dialogs.empty() ? store.create_dialog(new_dialog_id(), std::nullopt).id : dialogs[0].id;
  store.set_current_dialog(id);
  return id;
}

// One handler per route; the front end registers them (the /current routes
// before the {id} ones, whose id is req.matches[1]) and applies the Host
// guard, auth, CORS and drain rules. Every answer is JSON; a StoreError
// becomes 503 "store_unavailable".
class DialogsApi {
 public:
  static constexpr std::size_t kMaxTitleBytes = 1024;

  // `current_mu`: held while the current dialog is read and maybe created,
  // shared with the chat route (Core::current_dialog_mu); `health`: where a
  // store failure is counted and logged.
  DialogsApi(std::shared_ptr<DialogStore> store, std::mutex& current_mu, StoreHealth& health)
      : store_(std::move(store)), current_mu_(current_mu), health_(health) {}

  // Makes sure a current dialog exists: the current one if it still exists,
  // else the most recently updated dialog, else a new one.
  void ensure_current_dialog() { (void)current_id(); }

  // GET /api/dialogs
  void list_dialogs(const httplib::Request&, httplib::Response& res) {
    guarded(res, [&] {
      const std::string current = current_id();
      reply(res, 200, dialog_list_json(store_->list_dialogs(), current));
    });
  }

  // POST /api/dialogs, body {} or {"title": ..., "set_current": bool}
  void create_dialog(const httplib::Request& req, httplib::Response& res) {
    guarded(res, [&] {
      json body = json::object();
      if (!req.body.empty() && !parse_body(req.body, body, res)) return;
      std::optional<std::string> title;
      if (const auto it = body.find("title"); it != body.end() && !it->is_null()) {
        std::string error;
        title = valid_title(*it, error);
        if (!title) return fail(res, 422, error);
      }
      bool set_current = true;
      if (const auto it = body.find("set_current"); it != body.end()) {
        if (!it->is_boolean()) return fail(res, 422, "set_current: must be a boolean");
        set_current = it->get<bool>();
      }
      std::string id = new_dialog_id();
      while (store_->find_dialog(id)) id = new_dialog_id();
      const DialogInfo dialog = store_->create_dialog(id, title);
      if (set_current) {
        std::lock_guard<std::mutex> lock(current_mu_);
        store_->set_current_dialog(dialog.id);
      }
      reply(res, 200, dialog_json(dialog));
    });
  }

  // GET /api/dialogs/current: {"id": ..., "meta": {the dialog}}
  void get_current(const httplib::Request&, httplib::Response& res) {
    guarded(res, [&] {
      const std::string id = current_id();
      const auto dialog = store_->find_dialog(id);
      json body{{"id", id}};
      if (dialog) body["meta"] = dialog_json(*dialog);
      reply(res, 200, body);
    });
  }

  // PATCH /api/dialogs/current?id=ID
  void set_current(const httplib::Request& req, httplib::Response& res) {
    guarded(res, [&] {
      if (!req.has_param("id")) return fail(res, 422, "id: query parameter required");
      const std::string id = req.get_param_value("id");
      if (!valid_dialog_id(id)) return fail(res, 422, kBadId);
      std::lock_guard<std::mutex> lock(current_mu_);
      if (!store_->find_dialog(id)) return not_found(res, id);
      try {
        store_->set_current_dialog(id);
      } catch (const std::invalid_argument&) {  // deleted meanwhile
        return not_found(res, id);
      }
      reply(res, 200, json{{"ok", true}, {"id", id}});
    });
  }

  // GET /api/dialogs/{id}
  void get_dialog(const httplib::Request& req, httplib::Response& res) {
    guarded(res, [&] {
      const std::string id = path_id(req);
      if (!valid_dialog_id(id)) return fail(res, 422, kBadId);
      const auto dialog = store_->find_dialog(id);
      if (!dialog) return not_found(res, id);
      reply(res, 200, dialog_json(*dialog));
    });
  }

  // PATCH /api/dialogs/{id}, body {"title": "..."}: answers the dialog.
  void patch_dialog(const httplib::Request& req, httplib::Response& res) {
    guarded(res, [&] {
      const std::string id = path_id(req);
      if (!valid_dialog_id(id)) return fail(res, 422, kBadId);
      json body;
      if (!parse_body(req.body, body, res)) return;
      const auto it = body.find("title");
      if (it == body.end()) return fail(res, 422, "title: field required");
      std::string error;
      const auto title = valid_title(*it, error);
      if (!title) return fail(res, 422, error);
      const auto dialog = store_->rename_dialog(id, *title);
      if (!dialog) return not_found(res, id);
      reply(res, 200, dialog_json(*dialog));
    });
  }

  // DELETE /api/dialogs/{id}: {"ok": true, "current_dialog_id": ...}; a
  // deleted current dialog is replaced by the most recent one, or a new one.
  void delete_dialog(const httplib::Request& req, httplib::Response& res) {
    guarded(res, [&] {
      const std::string id = path_id(req);
      if (!valid_dialog_id(id)) return fail(res, 422, kBadId);
      if (!store_->delete_dialog(id)) return not_found(res, id);
      const std::string current = current_id();
      reply(res, 200, json{{"ok", true}, {"current_dialog_id", current}});
    });
  }

  // GET /api/dialogs/{id}/history?limit=L&before=B
  void history(const httplib::Request& req, httplib::Response& res) {
    guarded(res, [&] {
      const std::string id = path_id(req);
      if (!valid_dialog_id(id)) return fail(res, 422, kBadId);
      std::optional<long long> limit, before;
      if (req.has_param("limit")) {
        limit = parse_integer(req.get_param_value("limit"));
        if (!limit || *limit < 1) return fail(res, 422, "limit: must be a positive integer");
      }
      if (req.has_param("before")) {
        before = parse_integer(req.get_param_value("before"));
        if (!before || *before < 0) {
          return fail(res, 422, "before: must be a non-negative integer");
        }
      }
      if (!store_->find_dialog(id)) return not_found(res, id);
      reply(res, 200, history_.page(*store_, id, limit, before));
    });
  }

  // GET /api/dialogs/{id}/session: no checkpoints here, so nothing to approve.
  void session(const httplib::Request& req, httplib::Response& res) {
    guarded(res, [&] {
      const std::string id = path_id(req);
      if (!valid_dialog_id(id)) return fail(res, 422, kBadId);
      if (!store_->find_dialog(id)) return not_found(res, id);
      reply(res, 200, json{{"has_unapproved", false}, {"changed_files", json::array()}});
    });
  }

 private:
  static constexpr const char* kBadId = "id: must be 1 to 128 characters of [A-Za-z0-9_-]";

  // The current dialog's id, made to exist (see ensure_current_dialog).
  std::string current_id() {
    std::lock_guard<std::mutex> lock(current_mu_);
    return detail::ensure_current_dialog(*store_);
  }

  // A store failure is logged (at most once a minute) and counted, and the
  // client gets 503 store_unavailable with nothing of the store's message.
  template <typename F>
  void guarded(httplib::Response& res, F&& handler) {
    try {
      handler();
      health_.succeeded();
    } catch (const StoreError& e) {
      health_.failed("the dialogs API", e);
      res.status = 503;
      res.set_header("Retry-After", kRetryAfterSeconds);
      res.set_content(error_body(kStoreUnavailable, "store_unavailable"), "application/json");
    }
  }

  static void reply(httplib::Response& res, int status, const json& body) {
    res.status = status;
    res.set_content(dump_json(body), "application/json");
  }

  static void fail(httplib::Response& res, int status, const std::string& message) {
    res.status = status;
    res.set_content(error_body(message), "application/json");
  }

  static void not_found(httplib::Response& res, const std::string& id) {
    fail(res, 404, "Dialog not found: " + id);
  }

  static std::string path_id(const httplib::Request& req) {
    return req.matches.size() > 1 ? req.matches[1].str() : std::string();
  }

  // A JSON object body, or false after answering 400/422.
  static bool parse_body(const std::string& text, json& out, httplib::Response& res) {
    if (json_nesting_depth(text) > kMaxJsonDepth) {
      fail(res, 400,
           "Invalid JSON: nested deeper than " + std::to_string(kMaxJsonDepth) + " levels");
      return false;
    }
    if (text.find('\0') != std::string::npos) {
      fail(res, 400, "Invalid JSON: the body contains a NUL byte");
      return false;
    }
    try {
      out = json::parse(text);
    } catch (const json::exception& e) {
      fail(res, 400, std::string("Invalid JSON: ") + e.what());
      return false;
    }
    if (!out.is_object()) {
      fail(res, 422, "body: must be a JSON object");
      return false;
    }
    return true;
  }

  // A title trimmed of surrounding whitespace, non-empty, at most
  // kMaxTitleBytes; or nullopt with `error` naming the problem.
  static std::optional<std::string> valid_title(const json& value, std::string& error) {
    if (!value.is_string()) {
      error = "title: must be a string";
      return std::nullopt;
    }
    const std::string& raw = value.get_ref<const std::string&>();
    const auto space = [](char c) { return std::isspace(static_cast<unsigned char>(c)) != 0; };
    const auto first = std::find_if_not(raw.begin(), raw.end(), space);
    const auto last = std::find_if_not(raw.rbegin(), raw.rend(), space).base();
    if (first >= last) {
      error = "title: must not be empty";
      return std::nullopt;
    }
    if (static_cast<std::size_t>(last - first) > kMaxTitleBytes) {
      error = "title: longer than " + std::to_string(kMaxTitleBytes) + " bytes";
      return std::nullopt;
    }
    return std::string(first, last);
  }

  // A decimal integer (optional leading '-') that fits a long long.
  static std::optional<long long> parse_integer(const std::string& text) {
    const std::size_t digits = !text.empty() && text[0] == '-' ? 1 : 0;
    if (digits == text.size()) return std::nullopt;
    for (std::size_t j = digits; j < text.size(); ++j) {
      if (text[j] < '0' || text[j] > '9') return std::nullopt;
    }
    try {
      return std::stoll(text);
    } catch (const std::out_of_range&) {
      return std::nullopt;
    }
  }

  std::shared_ptr<DialogStore> store_;
  // Serializes the choice of a current dialog, so that two requests never
  // both create a default one.
  std::mutex& current_mu_;
  StoreHealth& health_;
  HistoryCache history_;  // each ended turn's history, computed once
};

}  // namespace detail
}  // namespace agentsmithy
