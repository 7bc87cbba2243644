// Package values converts between JSON and Vertebra's typed values, the
// XML-RPC-like elements that carry op arguments and results in namespace
// http://xmlschema.engineyard.com/agent/api.
//
// # The mapping
//
//	JSON                              Vertebra element
//	object {"k": v, ...}              <struct> with one named child per member: <T name="k">v</T>
//	array [v, ...]                    <list> with unnamed children
//	string "s"                        <string>s</string>
//	integer that fits 32 bits         <i4>n</i4>            (<int> accepted on input)
//	any other number                  <double>n</double>    (the JSON text is kept as is)
//	true / false                      <boolean>1</boolean> / <boolean>0</boolean>
//	null                              <nil/>
//
// JSON to XML to JSON gives back the same JSON: member order and duplicate
// keys are kept, and a number keeps its text (so 9007199254740993 and 1.10
// survive, which a float64 would not). The only change is "-0" (an i4),
// which comes back as 0.
//
// Two things XML cannot carry through servers are written differently: a
// string with a carriage return (which XML turns into a line feed) is sent
// base64-encoded as <string enc="base64">, and a member name with a tab,
// carriage return or line feed (which XML turns into spaces in attribute
// values) is sent in a name-base64 attribute instead of name. Characters
// XML 1.0 forbids altogether (NUL and most C0 controls, U+FFFE, U+FFFF)
// cannot be sent: encoding fails with ErrUnrepresentable.
//
// On input only, three more types map to JSON strings:
//
//	<base64>SGk=</base64>                                  "SGk="  (whitespace removed; must be valid standard base64)
//	<dateTime.iso8601>19980717T14:08:55</dateTime.iso8601> "1998-07-17T14:08:55Z"  (RFC 3339; no zone means UTC)
//	<res>/cluster/rd00</res>                              "/cluster/rd00"
//
// and on input <boolean> accepts true/false, numbers may have surrounding
// whitespace, and <double> accepts any text strconv.ParseFloat accepts
// (written back in JSON form). NaN and infinities have no JSON form and
// are refused.
//
// # Payloads
//
// A payload (op arguments, the values of a data, nack or error element) is
// a sequence of value elements, mapped to one JSON value by [AppendPayload]
// and [PayloadDecoder]:
//
//   - no payload (nil) ↔ no value elements;
//   - an object with at least one member ↔ one named element per member,
//     the way Vertebra passes named arguments;
//   - any other JSON value, including {} ↔ a single unnamed element.
//
// Named and unnamed elements cannot be mixed.
//
// # Limits
//
// Decoding never trusts its input: nesting depth, the size of the JSON
// produced and the number of values are bounded by [Limits]; a value that
// breaks a rule is reported as an [*Error] naming the element path, which
// wraps one of [ErrInvalid], [ErrLimit] or [ErrUnrepresentable].
package values
