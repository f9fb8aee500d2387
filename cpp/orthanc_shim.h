// The C++ half of the cxx bridge to the Orthanc plugin SDK (src/orthanc/bridge.rs is the Rust half).
// Owns the SDK context pointer and the C callbacks; holds no plugin logic (that lives in Rust).
#pragma once

#include <orthanc/OrthancCPlugin.h>

#include <cstdint>
#include <memory>
#include <string>

#include "rust/cxx.h"

namespace desam_shim {

// The answer of one call into Orthanc's REST API: the error code and the owned body buffer
// (released with OrthancPluginFreeMemoryBuffer in the destructor; Rust reads it without copying).
class Answer {
 public:
  Answer();
  ~Answer();
  Answer(const Answer&) = delete;
  Answer& operator=(const Answer&) = delete;

  int32_t code() const;
  rust::Slice<const uint8_t> data() const;
  rust::String error() const;

  OrthancPluginMemoryBuffer buffer_;
  OrthancPluginErrorCode code_;
  bool owns_;
};

// The answer of a full REST call (OrthancPluginCallRestApi): error code, HTTP status, body and the
// answer's headers as Orthanc formats them (a JSON object), for revision checks (ETag / If-Match).
class FullAnswer {
 public:
  FullAnswer();
  ~FullAnswer();
  FullAnswer(const FullAnswer&) = delete;
  FullAnswer& operator=(const FullAnswer&) = delete;

  int32_t code() const;
  uint16_t status() const;
  rust::Slice<const uint8_t> body() const;
  rust::Slice<const uint8_t> headers() const;

  OrthancPluginMemoryBuffer body_;
  OrthancPluginMemoryBuffer headers_;
  OrthancPluginErrorCode code_;
  uint16_t status_;
};

void init_context(OrthancPluginContext* context);
bool check_version();
rust::String orthanc_version();
void set_description(rust::Str text);
void log_message(uint8_t level, rust::Str message);
rust::String get_configuration();

std::unique_ptr<Answer> rest_get(rust::Str uri);
std::unique_ptr<Answer> rest_post(rust::Str uri, rust::Slice<const uint8_t> body);
int32_t rest_delete(rust::Str uri);
// method: 1 GET, 2 POST, 3 PUT, 4 DELETE; `if_match` empty for none.
std::unique_ptr<FullAnswer> rest_call(uint32_t method, rust::Str uri, rust::Str if_match, rust::Slice<const uint8_t> body);

rust::String get_global_property(int32_t property, rust::Str default_value);
int32_t set_global_property(int32_t property, rust::Str value);
void set_metric(rust::Str name, float value, bool is_timer);

void register_rest_route(rust::Str path_regex);
void register_on_change();
// Creates an Orthanc job whose callbacks forward to Rust with `handle`, submits it and returns its id.
rust::String submit_job(uint64_t handle, rust::Str job_type, int32_t priority);

}  // namespace desam_shim
